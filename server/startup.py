"""From settings to a loaded model: check the model folder, choose the plan, convert once, load."""

from __future__ import annotations

import logging

from .config import Settings, UserError
from .convert import ConversionError, missing_files
from .model import LoadedModel, ModelLoadError, load_model
from .profiles import plan_for, probe_hardware

log = logging.getLogger(__name__)


def load_for(settings: Settings) -> LoadedModel:
    model_dir = settings.model_dir
    missing = missing_files(model_dir) if model_dir.is_dir() else ["the whole folder"]
    if missing:
        raise UserError(
            f"模型文件缺失 / Model files are missing in {model_dir}: {', '.join(missing)}.\n"
            "请从 https://huggingface.co/THUDM/chatglm2-6b 下载 config.json、tokenizer.model 和全部权重文件放入该文件夹。\n"
            "Download config.json, tokenizer.model and all weight files of THUDM/chatglm2-6b into that folder.")
    try:
        plan = plan_for(settings, probe_hardware())
        log.info("profile %s on %s, %s: %s", plan.profile, plan.device, plan.precision, plan.reason)
        return load_model(model_dir, plan)
    except (ValueError, ConversionError, ModelLoadError) as exc:
        raise UserError(f"无法加载模型 / Cannot load the model: {exc}") from exc

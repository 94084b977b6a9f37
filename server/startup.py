"""From settings to a loaded model: download what is missing, choose the plan, convert once, load."""

from __future__ import annotations

import logging

from .config import Settings, UserError
from .bootstrap import Report, ensure_model
from .convert import ConversionError
from .model import LoadedModel, ModelLoadError, load_model
from .profiles import plan_for, probe_hardware

log = logging.getLogger(__name__)


def load_for(settings: Settings, report: Report | None = None) -> LoadedModel:
    """Download what is missing (first start), then plan, convert once and load."""
    ensure_model(settings, report)
    model_dir = settings.model_dir
    try:
        plan = plan_for(settings, probe_hardware())
        log.info("profile %s on %s, %s: %s", plan.profile, plan.device, plan.precision, plan.reason)
        return load_model(model_dir, plan)
    except (ValueError, ConversionError, ModelLoadError) as exc:
        raise UserError(f"无法加载模型 / Cannot load the model: {exc}") from exc

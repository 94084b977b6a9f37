"""From settings to a loaded model: download what is missing, choose the plan, convert once, load."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import Settings, UserError
from .model.profiles import plan_for, probe_hardware
from .setup.bootstrap import Report, ensure_model
from .setup.gpu import unused_gpu_notice

log = logging.getLogger(__name__)


def make_engine(settings: Settings):
    """The engine the settings ask for and the loader that feeds it (engine.attach(loader(engine))): a local model,
    or with --backend a front end whose upstream engines generate (it loads only the tokenizer)."""
    from .engine import Engine
    from .upstream import UpstreamEngine

    if settings.backend:
        urls = [url.strip() for url in settings.backend.split(",") if url.strip()]
        try:
            engine = UpstreamEngine(urls, max_queue=settings.max_queue, reply_reserve=settings.reply_reserve,
                                    max_batch=settings.max_batch, max_context=settings.max_context,
                                    api_key=settings.backend_key)
        except ValueError as exc:
            raise UserError(f"--backend 有误 / --backend: {exc}") from exc
        return engine, lambda engine: load_tokenizer_for(settings, report=engine.set_state)
    engine = Engine(max_queue=settings.max_queue, reply_reserve=settings.reply_reserve,
                    max_batch=settings.max_batch, prompt_cache_mb=settings.prompt_cache_mb,
                    prefill_chunk=settings.prefill_chunk, prompt_cache_disk_mb=disk_cache_mb(settings))
    return engine, lambda engine: load_for(settings, report=engine.set_state, notice=engine.add_notice)


def load_tokenizer_for(settings: Settings, report: Report | None = None):
    """A front end's whole model: tokenizer.model, downloaded alone when missing (-> ChatGLM2Tokenizer)."""
    from .model.family import family_of
    from .model.tokenizer import load_tokenizer

    ensure_model(settings, report, only=("tokenizer.model",))
    try:  # (a folder with the tokenizer alone speaks the chosen --model's format)
        return load_tokenizer(settings.model_dir, family_of(settings.model))
    except ValueError as exc:
        raise UserError(f"无法加载分词器 / Cannot load the tokenizer: {exc}") from exc


def load_for(settings: Settings, report: Report | None = None, notice: Callable[[str], None] | None = None):
    """Download what is missing (first start), then plan, convert once and load (-> LoadedModel).

    `notice` receives lines the person should see until they act (console, /health and the page show them)."""
    ensure_model(settings, report)
    # the model stack (torch, transformers) is imported from here on
    from .model import cpu_threads
    from .model.convert import ConversionError
    from .model.loader import ModelLoadError, load_model

    model_dir = settings.model_dir
    try:
        threads = cpu_threads.apply(settings.threads)  # (before the kernels are timed: they run on these threads)
        hardware = probe_hardware()
        gpu_notice = None if settings.device == "cpu" else unused_gpu_notice(hardware.cuda)
        if gpu_notice:
            log.warning("%s", gpu_notice)
            if notice:
                notice(gpu_notice)
        plan = plan_for(settings, hardware)
        log.info("profile %s on %s, %s: %s", plan.profile, plan.device, plan.precision, plan.reason)
        report = report or (lambda state, **detail: None)
        report("loading", progress=0.0)
        loaded = load_model(model_dir, plan, progress=lambda done: report("loading", progress=round(done, 4),
                                                                           stage="converting"))
        loaded.cpu_threads = threads.as_dict() if plan.device == "cpu" else None
        return loaded
    except (ValueError, ConversionError, ModelLoadError) as exc:
        raise UserError(f"无法加载模型 / Cannot load the model: {exc}") from exc


def disk_cache_mb(settings: Settings) -> int:
    """As asked, or 2 GB where the model folder's disk has 8 GB free (0: off)."""
    if settings.prompt_cache_disk_mb is not None:
        return settings.prompt_cache_disk_mb
    from .model.disk import free_bytes

    return 2048 if free_bytes(settings.model_dir) >= 8 * 1024**3 else 0

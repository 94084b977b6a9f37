"""The engine contract: what the HTTP layer may use of an engine, the local one (engine.Engine) or a front end
over other engines (upstream.UpstreamEngine), and the state both report through /health."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..config import UserError

if TYPE_CHECKING:
    from .budget import FittedPrompt, GenerationRequest
    from .jobs import Job


class EngineState:
    """The state (loading, downloading, ready, unavailable or error), its details and the notices a person should
    act on: set by the loader and the engine, read by /health."""

    def __init__(self):
        self._state = "loading"
        self._detail: dict = {}
        self.notices: list[str] = []

    def set_state(self, state: str, **detail) -> None:
        self._state, self._detail = state, detail

    def add_notice(self, text: str) -> None:
        self.notices.append(text)


log = logging.getLogger("server.engine.engine")  # (where these lines have always come from)


@runtime_checkable
class GenerationEngine(Protocol):
    """What web/ calls. `constrained_decoding`: whether it has the model's logits (grammars, logprobs)."""

    constrained_decoding: bool
    loaded: Any  # the LoadedModel (a front end's: tokenizer and plan only), None while loading
    notices: list[str]
    max_batch: int
    max_queue: int

    @property
    def state(self) -> str: ...

    @property
    def detail(self) -> dict: ...

    @property
    def max_context(self) -> int | None: ...

    @property
    def queue_length(self) -> int: ...

    @property
    def queued_ids(self) -> list[str]: ...

    @property
    def running_ids(self) -> list[str]: ...

    @property
    def running_id(self) -> str | None: ...

    def fit(self, request: GenerationRequest) -> FittedPrompt: ...

    def submit(self, request: GenerationRequest) -> Job: ...

    def submit_all(self, requests: list[GenerationRequest]) -> list[Job]: ...

    def interrupt(self, job_id: str | None = None) -> bool: ...

    def load_in_background(self, loader: Callable, on_ready: Callable | None = None): ...

    def set_state(self, state: str, **detail) -> None: ...

    def add_notice(self, text: str) -> None: ...

    def close(self) -> None: ...


def load_in_background(engine, loader: Callable, on_ready: Callable | None = None) -> threading.Thread:
    """`engine.attach(loader(engine))` on a thread, then `on_ready(engine.loaded)`. A failure is reported through
    /health (state error) and the console; the server keeps answering to show it."""
    def run():
        try:
            engine.attach(loader(engine))
        except Exception as exc:
            if isinstance(exc, UserError):
                log.error("%s", exc)
            else:
                log.exception("loading the model failed")
            log.error("模型加载失败；服务继续运行，只为在 /health 和聊天页上显示原因。修正后请重新启动。 / The model did not "
                      "load; the server keeps running only to show why (at /health and on the chat page). Fix it "
                      "and start again.")
            engine.set_state("error", error=str(exc))
            return
        if on_ready:
            on_ready(engine.loaded)

    thread = threading.Thread(target=run, name="model-loader", daemon=True)
    thread.start()
    return thread

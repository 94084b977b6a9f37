"""The engine contract: what the HTTP layer may use of an engine, the local one (engine.Engine) or a front end
over other engines (upstream.UpstreamEngine), and the state both report through /health."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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

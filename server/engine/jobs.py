"""A job and the events it reports: `Update` while it generates, one `Finished` at the end."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..model.tokenizer import clean_reply
from .budget import FittedPrompt, GenerationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    text: str  # the whole reply so far as ChatGLM2 shows it: answer prefix + cleaned generated text
    completion_tokens: int
    generated: str = ""  # the raw generated text so far (after stop strings are cut), without the prefix


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop, length, interrupted or error
    text: str
    generated: str
    prompt_tokens: int
    completion_tokens: int
    dropped_rounds: int
    seconds: float
    first_token_seconds: float | None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed again)


class EventQueue:
    """A job's events for its reader. Every Update carries the whole reply so far, so a reader that falls behind
    loses nothing when the older ones go: past MAX_PENDING waiting events, a new Update replaces the newest
    waiting one. A client that stops reading thus holds a few replies' worth of memory, not every intermediate
    reply of a long generation (~300 MB for 8k tokens before)."""

    MAX_PENDING = 16

    def __init__(self):
        self._items: deque = deque()
        self._ready = threading.Condition()

    def put(self, event) -> None:
        with self._ready:
            if isinstance(event, Update) and len(self._items) >= self.MAX_PENDING \
                    and isinstance(self._items[-1], Update):
                self._items[-1] = event
            else:
                self._items.append(event)
            self._ready.notify()

    def get(self, timeout: float | None = None):
        """The oldest waiting event; queue.Empty after `timeout` seconds without one (None: wait for one)."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Job:
    request: GenerationRequest
    prompt: FittedPrompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Finished | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob per completion token, when the request asks
    prompt_logprobs: list | None = None  # TokenLogprob (None for the first) per prompt token, with echo
    _events: EventQueue = field(default_factory=lambda: EventQueue())
    _on_finished: list[Callable[[Finished], None]] = field(default_factory=list)
    _finish_lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self, timeout: float | None = None) -> Iterator[Update | Finished]:
        """Updates as they come, ending with the Finished event (queue.Empty after `timeout` of silence)."""
        while True:
            event = self.next_event(timeout)
            yield event
            if isinstance(event, Finished):
                return

    def next_event(self, timeout: float | None = None) -> Update | Finished:
        return self._events.get(timeout)

    def wait(self, timeout: float | None = None) -> Finished:
        for event in self.events(timeout):
            if isinstance(event, Finished):
                return event
        raise AssertionError("events() always ends with Finished")

    def cancel(self) -> None:
        self.cancelled.set()

    def when_finished(self, callback: Callable[[Finished], None]) -> None:
        """Call `callback(finished)` once the job ends (at once when it already has), whoever still listens."""
        with self._finish_lock:
            if self.result is None:
                self._on_finished.append(callback)
                return
        callback(self.result)

    def emit(self, event: Update | Finished) -> None:
        if isinstance(event, Finished):
            with self._finish_lock:
                self.result = event
            for callback in self._on_finished:
                try:
                    callback(event)
                except Exception:  # a failing log line must not keep the client from its end event
                    log.warning("a callback of job %s failed", self.id, exc_info=True)
        self._events.put(event)

    def show(self, generated: str, completion_tokens: int, shown: str) -> str:
        """Emit an Update when the reply as ChatGLM2 shows it (prefix + cleaned text) differs from `shown`, the
        text of the last one; returns the reply as shown now."""
        text = self.request.answer_prefix + clean_reply(generated)
        if text != shown:
            self.emit(Update(text=text, completion_tokens=completion_tokens, generated=generated))
        return text

    def finish(self, generated: str, shown: str, reason: str, completion_tokens: int, first_token_at: float | None,
               cached_tokens: int = 0, error: str | None = None) -> None:
        """The last Update (when the final text differs from what was shown) and the Finished event (reason
        `error` when `error` is set)."""
        final = self.show(generated, completion_tokens, shown)
        now = time.perf_counter()
        self.emit(Finished(
            finish_reason="error" if error else reason, text=final, generated=generated,
            prompt_tokens=len(self.prompt.ids), completion_tokens=completion_tokens,
            dropped_rounds=self.prompt.dropped_rounds, seconds=now - self.submitted,
            first_token_seconds=None if first_token_at is None else first_token_at - self.submitted,
            error=error, cached_tokens=cached_tokens))

    def finish_unstarted(self, reason: str, error: str | None = None) -> None:
        """End a job without its reply: it never reached the model (interrupted while queued, the engine closed),
        or the engine failed around it (reason `error`, with the error)."""
        self.emit(Finished(
            finish_reason=reason, text=self.request.answer_prefix, generated="", prompt_tokens=len(self.prompt.ids),
            completion_tokens=0, dropped_rounds=self.prompt.dropped_rounds,
            seconds=time.perf_counter() - self.submitted, first_token_seconds=None, error=error))


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop string. Returns (visible text, whether a stop string was found).

    While no stop string is complete, a tail that could still become one is held back from view.
    """
    if not stops:
        return text, False
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if hits:
        return text[:min(hits)], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False

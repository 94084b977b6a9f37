"""The generation engine: one worker thread owns the model and serves jobs from an explicit FIFO queue.

A job is submitted (its prompt fitted to the context at once, so callers learn about overflow before anything
streams), waits its turn, and reports `Update` events while it generates and one `Finished` event at the end.
Interrupts and disconnects set a job's cancel flag, which the worker checks after every token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .budget import FittedPrompt, GenerationRequest, fit_prompt
from .config import UserError
from .tokenizer import clean_reply

if TYPE_CHECKING:  # torch and transformers are imported when a model arrives, so HTTP can start without them
    from .model import LoadedModel

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """The queue is full."""


class NotReady(Exception):
    """The model is not loaded (yet, or loading failed)."""


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


@dataclass
class Job:
    request: GenerationRequest
    prompt: FittedPrompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Finished | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)
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
        return self._events.get(timeout=timeout)

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

    def _emit(self, event: Update | Finished) -> None:
        if isinstance(event, Finished):
            with self._finish_lock:
                self.result = event
            for callback in self._on_finished:
                callback(event)
        self._events.put(event)


class Engine:
    def __init__(self, max_queue: int = 8, reply_reserve: int = 512):
        self.max_queue = max_queue
        self.reply_reserve = reply_reserve
        self.state = "loading"  # loading, downloading, ready or error
        self.detail: dict = {}  # what /health shows beside the state (progress, error, model facts)
        self.notices: list[str] = []  # lines the person should act on (e.g. a GPU torch cannot use)
        self.loaded: LoadedModel | None = None
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._mask = None  # added to logits: bans ids the tokenizer cannot show

    # -- lifecycle -------------------------------------------------------------------------------------------
    def load_in_background(self, loader: Callable[["Engine"], LoadedModel],
                           on_ready: Callable[[LoadedModel], None] | None = None) -> threading.Thread:
        """Run `loader(engine)` on a thread (it may report progress through set_state) and start serving."""
        def run():
            try:
                self.attach(loader(self))
            except Exception as exc:  # reported through /health; the server keeps answering
                if isinstance(exc, UserError):
                    log.error("%s", exc)
                else:
                    log.exception("loading the model failed")
                log.error("模型加载失败；服务继续运行，只为在 /health 和聊天页上显示原因。修正后请重新启动。 / The model "
                          "did not load; the server keeps running only to show why (at /health and on the chat "
                          "page). Fix it and start again.")
                self.set_state("error", error=str(exc))
                return
            if on_ready:
                on_ready(self.loaded)

        thread = threading.Thread(target=run, name="model-loader", daemon=True)
        thread.start()
        return thread

    def attach(self, loaded: LoadedModel) -> None:
        """Take a loaded model and start the worker."""
        from .generate import vocabulary_mask

        self.loaded = loaded
        tok = loaded.tokenizer
        self._mask = vocabulary_mask(loaded.model.config.vocab_size, tok.first_special_id, tok.eos_id, loaded.device)
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        self.set_state("ready")

    def set_state(self, state: str, **detail) -> None:
        self.state, self.detail = state, detail

    def add_notice(self, text: str) -> None:
        self.notices.append(text)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._pending:
                job.cancel()
            self._lock.notify_all()
        if self._running:
            self._running.cancel()
        if self._worker:
            self._worker.join(timeout=30)

    # -- requests --------------------------------------------------------------------------------------------
    def fit(self, request: GenerationRequest) -> FittedPrompt:
        """Fit a request into the context (raises ContextOverflow)."""
        return fit_prompt(self._ready().tokenizer, request, self.max_context, self.reply_reserve)

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request=request, prompt=self.fit(request))
        with self._lock:
            if len(self._pending) >= self.max_queue:
                raise EngineBusy(f"the server is busy: {len(self._pending)} requests are already waiting; "
                                 f"try again in a moment")
            self._pending.append(job)
            self._lock.notify()
        return job

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the running job, or the job `job_id` whether queued or running. False when there was none."""
        with self._lock:
            running = self._running
            if job_id is None or (running and running.id == job_id):
                if running is None:
                    return False
                running.cancel()
                return True
            for job in self._pending:
                if job.id == job_id:
                    self._pending.remove(job)
                    job.cancel()
                    self._finish_unstarted(job, "interrupted")
                    return True
        return False

    @property
    def max_context(self) -> int | None:
        return self.loaded.plan.max_context if self.loaded else None

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def running_id(self) -> str | None:
        return self._running.id if self._running else None

    def _ready(self) -> LoadedModel:
        if self.state != "ready" or self.loaded is None:
            raise NotReady(f"the model is not ready ({self.state})")
        return self.loaded

    # -- the worker ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._running = self._pending.popleft()
            try:
                if job.cancelled.is_set():
                    self._finish_unstarted(job, "interrupted")
                else:
                    self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        import torch

        from .generate import Sampling, generate_ids

        loaded = self.loaded
        tok = loaded.tokenizer
        req = job.request
        decoder = tok.stream_decoder()
        sampling = Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        reason, n_tokens, first_token_at, error = "length", 0, None, None
        shown = req.answer_prefix
        try:
            for token in generate_ids(loaded.model, job.prompt.ids, job.prompt.max_new_tokens, sampling, self._mask):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if token == tok.eos_id:
                    reason = "stop"
                    break
                n_tokens += 1
                if decoder.add(token):
                    visible, hit = apply_stop(decoder.text, req.stop)
                    text = req.answer_prefix + clean_reply(visible)
                    if text != shown:
                        shown = text
                        job._emit(Update(text=text, completion_tokens=n_tokens, generated=visible))
                    if hit:
                        reason = "stop"
                        break
                if job.cancelled.is_set():
                    reason = "interrupted"
                    break
        except Exception as exc:  # out of memory or a model error: this job fails, the engine goes on
            log.exception("job %s failed", job.id)
            reason, error = "error", f"{type(exc).__name__}: {exc}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        decoder.flush()
        generated = apply_stop(decoder.text, req.stop)[0]
        final = req.answer_prefix + clean_reply(generated)
        if final != shown:
            job._emit(Update(text=final, completion_tokens=n_tokens, generated=generated))
        now = time.perf_counter()
        job._emit(Finished(
            finish_reason=reason, text=final, generated=generated, prompt_tokens=len(job.prompt.ids),
            completion_tokens=n_tokens,
            dropped_rounds=job.prompt.dropped_rounds, seconds=now - job.submitted,
            first_token_seconds=None if first_token_at is None else first_token_at - job.submitted, error=error))

    def _finish_unstarted(self, job: Job, reason: str) -> None:
        job._emit(Finished(
            finish_reason=reason, text=job.request.answer_prefix, generated="", prompt_tokens=len(job.prompt.ids),
            completion_tokens=0, dropped_rounds=job.prompt.dropped_rounds,
            seconds=time.perf_counter() - job.submitted, first_token_seconds=None))


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

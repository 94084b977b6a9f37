"""The engine surface (submit, interrupt, fit, state) in front of OpenAI-compatible engines (`--backend URL`).

The project still does everything but the forward passes: the prompt is fitted to the context and formatted
here, with the local tokenizer (no weights, no torch), so the answer prefix, dropped history rounds, stop strings
and the `[[训练时间]]` rule behave exactly as with a local model. Each job goes to the least busy upstream as a
streamed `/completions` request (token ids as the prompt, or the prompt's text where an upstream refuses ids); a
thread per job turns the upstream's text deltas into the job's Update events. An interrupt or a client that left
closes the upstream stream, which the engines take as a cancel.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.budget import MIN_TEMPERATURE, FittedPrompt, GenerationRequest, fit_prompt
from ..engine.contract import EngineState, load_in_background
from ..engine.engine import EngineBusy, NotReady
from ..engine.jobs import Job, apply_stop
from ..errors import UpstreamRejected  # noqa: F401 (defined in errors.py, importable here too)
from ..model.tokenizer import ChatGLM2Tokenizer
from . import client
from .pool import Pool, Upstream

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192  # ChatGLM2-6B's chat context, when neither --max-context nor an upstream says
PER_UPSTREAM = 8  # requests in flight per upstream by default (--max-batch 0); the engines batch them
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "interrupted"}


@dataclass(frozen=True)
class FrontEndPlan:
    """What /health and the console say about a front end, in the fields a local model's Plan has."""
    models: str
    max_context: int
    device: str = "upstream"
    profile: str = "backend"

    @property
    def precision(self) -> str:
        return self.models


@dataclass(frozen=True)
class FrontEnd:
    """The front end's counterpart of LoadedModel: a tokenizer and no model."""
    tokenizer: ChatGLM2Tokenizer
    plan: FrontEndPlan


@dataclass
class Running:
    job: Job
    upstream: Upstream
    stream: client.Stream


class UpstreamEngine(EngineState):
    """The front end (the GenerationEngine contract, engine/contract.py): each job relayed to an upstream."""

    constrained_decoding = False  # no logits here: grammars and logprobs are refused by name

    def __init__(self, urls: list[str], max_queue: int = 8, reply_reserve: int = 512, max_batch: int = 0,
                 max_context: int | None = None, api_key: str | None = None):
        self.pool = Pool([client.normalize_base(url) for url in urls], api_key)
        self.max_queue = max_queue
        self.reply_reserve = reply_reserve
        self.max_batch = max_batch or PER_UPSTREAM * len(urls)  # in flight at once, over all upstreams
        self._max_context = max_context
        super().__init__()
        self.loaded: FrontEnd | None = None
        self.prefix_cache = None  # the upstreams keep their own (vLLM's automatic prefix caching)
        self._jobs: dict[str, Running | None] = {}  # None: still connecting
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def load_in_background(self, loader: Callable[[UpstreamEngine], ChatGLM2Tokenizer],
                           on_ready: Callable[[FrontEnd], None] | None = None) -> threading.Thread:
        """Run `loader(engine)` (the tokenizer, downloaded if missing) on a thread, then ask the upstreams."""
        return load_in_background(self, loader, on_ready)

    def attach(self, tokenizer: ChatGLM2Tokenizer) -> None:
        self.pool.probe_all()
        self.pool.start_prober()
        names = sorted({u.model for u in self.pool.upstreams if u.model}) or ["?"]
        self.loaded = FrontEnd(tokenizer, FrontEndPlan(models=", ".join(names), max_context=self.max_context))
        if not self.pool.any_up:
            log.warning("no upstream answers yet (%s); asking again", self.pool.errors())

    def close(self) -> None:
        self.pool.close()
        self.interrupt()

    @property
    def state(self) -> str:
        """loading (the tokenizer), ready (an upstream answers), unavailable (none does) or error."""
        if self.loaded is None:
            return self._state
        return "ready" if self.pool.any_up else "unavailable"

    @property
    def detail(self) -> dict:
        if self.loaded is None:
            return self._detail
        upstreams = {"upstreams": [u.describe() for u in self.pool.upstreams]}
        return upstreams if self.pool.any_up else {"error": f"no upstream answers: {self.pool.errors()}",
                                                   **upstreams}

    @property
    def max_context(self) -> int:
        return self._max_context or self.pool.max_context() or DEFAULT_CONTEXT

    # -- requests --------------------------------------------------------------------------------------------
    def fit(self, request: GenerationRequest) -> FittedPrompt:
        if self.loaded is None:
            raise NotReady(f"the front end is not ready ({self.state})")
        return fit_prompt(self.loaded.tokenizer, request, self.max_context, self.reply_reserve)

    def submit_all(self, requests: list[GenerationRequest]) -> list[Job]:
        """Several jobs (n choices), all or none; the upstream engines share their prompts as they can."""
        jobs = []
        try:
            for request in requests:
                jobs.append(self.submit(request))
        except Exception:
            for job in jobs:
                self.interrupt(job.id)
            raise
        return jobs

    def submit(self, request: GenerationRequest) -> Job:
        """Fit the request, open its stream on the least busy upstream that answers, and follow it on a thread.
        Raises NotReady when none answers, EngineBusy when too many are in flight or every upstream is busy,
        UpstreamRejected when an upstream refuses the request itself."""
        if not self.pool.any_usable:
            raise NotReady(f"the front end is not ready ({self.state})")
        job = Job(request=request, prompt=self.fit(request))
        with self._lock:
            if len(self._jobs) >= self.max_batch + self.max_queue:
                raise EngineBusy(f"the server is busy: {len(self._jobs)} requests are in flight; try again in a "
                                 "moment")
            self._jobs[job.id] = None
        try:
            upstream, stream = self._open(job)
        except BaseException:
            with self._lock:
                del self._jobs[job.id]
            raise
        running = Running(job, upstream, stream)
        with self._lock:
            self._jobs[job.id] = running
        threading.Thread(target=self._follow, args=(running,), name=f"job-{job.id}", daemon=True).start()
        return job

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the job `job_id`, or without an id every job (the seed's global stop). False when there was none."""
        with self._lock:
            chosen = [r for i, r in self._jobs.items() if r and (job_id is None or i == job_id)]
        for running in chosen:
            running.job.cancel()
            running.stream.close()  # ends the read that waits for the next event; the upstream cancels
        return bool(chosen)

    @property
    def queue_length(self) -> int:
        return 0  # nothing waits here: the upstreams queue and batch

    @property
    def queued_ids(self) -> list[str]:
        return []

    @property
    def running_ids(self) -> list[str]:
        with self._lock:
            return [job_id for job_id, running in self._jobs.items() if running]

    @property
    def running_id(self) -> str | None:
        return next(iter(self.running_ids), None)

    # -- talking to the upstreams ----------------------------------------------------------------------------
    def _open(self, job: Job) -> tuple[Upstream, client.Stream]:
        failures = []
        for upstream in self.pool.candidates():
            try:
                stream = self._open_on(upstream, job)
            except client.UpstreamError as exc:
                if not exc.unreachable:
                    raise UpstreamRejected(str(exc)) from None
                if exc.status != 429:  # busy is not broken
                    upstream.failed(str(exc))
                failures.append(exc)
                continue
            upstream.answered()
            self.pool.take(upstream)
            return upstream, stream
        if failures and all(exc.status == 429 for exc in failures):
            raise EngineBusy("every upstream engine is busy; try again in a moment")
        raise NotReady("; ".join(map(str, failures)) or "no upstream can be used now")

    def _open_on(self, upstream: Upstream, job: Job) -> client.Stream:
        """Token ids as the prompt; the prompt's text where the upstream refuses ids (learned once)."""
        key = self.pool.api_key
        banned = banned_ids(self.loaded.tokenizer, upstream.n_vocab)
        if upstream.accepts_ids is not False:
            try:
                stream = client.open_stream(upstream.url, "/completions", completion_body(upstream, job, banned),
                                            key)
            except client.UpstreamError as exc:
                if upstream.accepts_ids or exc.status not in (400, 422):
                    raise
                log.info("%s refused token ids as the prompt (%s); sending text", upstream.url, exc)
            else:
                upstream.accepts_ids = True
                return stream
        req, tokenizer = job.request, self.loaded.tokenizer
        if req.prompt_ids is not None:  # a raw prompt (/v1/completions): its text, after the prefix it has
            has_prefix = req.prompt_ids[:2] == tokenizer.prompt_prefix()
            text = ("[gMASK]sop" if has_prefix else "") + req.query
        else:
            text = tokenizer.prompt_text(req.query, req.history[job.prompt.dropped_rounds:], req.answer_prefix,
                                         req.system)
        try:
            stream = client.open_stream(upstream.url, "/completions", completion_body(upstream, job, banned, text),
                                        key)
        except client.UpstreamError:
            upstream.accepts_ids = None  # text failed too: the refusal was not about ids
            raise
        upstream.accepts_ids = False
        return stream

    def _follow(self, running: Running) -> None:
        """Read one job's stream to its end and report it."""
        job, upstream, stream = running.job, running.upstream, running.stream
        reply = Reply(job)
        error = None
        try:
            for event in stream.events():
                error = client.event_error(event)
                if error or not reply.add(event):
                    break
            else:
                if reply.reason is None and not job.cancelled.is_set():
                    error = "the upstream ended the stream before the reply was finished"
        except (OSError, http.client.HTTPException, client.UpstreamError) as exc:
            if not job.cancelled.is_set():  # an interrupt closes the stream: that is no failure
                error = f"the upstream stream broke: {client.describe(exc)}"
                upstream.failed(error)
        finally:
            stream.close()
            if job.cancelled.is_set() and reply.reason is None:
                reply.reason = "interrupted"
            self.pool.release(upstream, completed=error is None and reply.reason in ("stop", "length"))
            with self._lock:
                self._jobs.pop(job.id, None)
            if error:
                log.error("job %s on %s failed: %s", job.id, upstream.url, error)
            reply.finish(f"upstream {upstream.url}: {error}" if error else None)


class Reply:
    """One job's reply as its upstream streams it: text deltas, the finish reason, the usage."""

    def __init__(self, job: Job):
        self.job = job
        self.raw = ""  # everything the upstream generated so far
        self.shown = job.request.answer_prefix
        self.completion_tokens = 0
        self.reason: str | None = None
        self.usage: dict = {}
        self.first_token_at: float | None = None

    def add(self, event: dict) -> bool:
        """Take one streamed event; False when the reply ends here (a stop string, or an interrupt)."""
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            text = choice.get("text") or ""
            ids = choice.get("token_ids")  # vLLM's return_token_ids; otherwise one event is one token
            tokens = len(ids) if isinstance(ids, list) else int(bool(text))
            if tokens and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.completion_tokens += tokens
            self.raw += text
            if choice.get("finish_reason"):
                self.reason = FINISH_REASONS.get(choice["finish_reason"], "stop")
        visible, hit = apply_stop(self.raw, self.job.request.stop)
        self.shown = self.job.show(visible, self.completion_tokens, self.shown)
        if hit:
            self.reason = "stop"
        elif self.job.cancelled.is_set():
            self.reason = "interrupted"
        return not (hit or self.job.cancelled.is_set())

    def finish(self, error: str | None) -> None:
        generated = apply_stop(self.raw, self.job.request.stop)[0]
        counted = self.usage.get("completion_tokens")
        cached = (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        self.job.finish(generated, self.shown, self.reason or "stop",
                        counted if isinstance(counted, int) else self.completion_tokens, self.first_token_at,
                        cached if isinstance(cached, int) else 0, error)


def banned_ids(tokenizer: ChatGLM2Tokenizer, n_vocab: int | None) -> list[int]:
    """Ids a reply must never contain, as the local engine's vocabulary mask has it: the special tokens (eos is
    below them; ChatGLM3's <|user|> and <|observation|> end a reply and stay allowed) and the padding rows after
    them, as far as the upstream's vocabulary is known (vLLM refuses a logit_bias id beyond it, and does not say
    its size: then the special tokens)."""
    first = tokenizer.first_special_id
    return [i for i in range(first, max(n_vocab or 0, first + len(tokenizer.special_ids)))
            if i not in tokenizer.stop_ids]


def completion_body(upstream: Upstream, job: Job, banned: list[int], text: str | None = None) -> dict:
    """The streamed /completions request for a job: the fitted prompt (ids, or `text`), its reply budget and
    sampling fields every OpenAI-compatible engine takes, and a logit_bias that bans the `banned` ids."""
    req = job.request
    greedy = req.temperature < MIN_TEMPERATURE
    body = {"model": upstream.model or "chatglm2-6b", "prompt": job.prompt.ids if text is None else text,
            "max_tokens": job.prompt.max_new_tokens, "temperature": 0.0 if greedy else req.temperature,
            "top_p": 1.0 if greedy else req.top_p, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {**{str(i): b for i, b in req.logit_bias.items()}, **{str(i): -100 for i in banned}}}
    # the other sampling knobs under vLLM's and SGLang's names (llama-server also reads these; its repetition
    # penalty is `repeat_penalty`): sent only when set, so that an engine without one is not disturbed
    knobs = {"top_k": (req.top_k, 0), "min_p": (req.min_p, 0.0), "presence_penalty": (req.presence_penalty, 0.0),
             "frequency_penalty": (req.frequency_penalty, 0.0), "repetition_penalty": (req.repetition_penalty, 1.0)}
    body.update({name: value for name, (value, off) in knobs.items() if value != off})
    if req.repetition_penalty != 1.0:
        body["repeat_penalty"] = req.repetition_penalty
    if req.seed is not None:
        body["seed"] = req.seed % 2**63  # the engines take a signed 64-bit seed
    if req.stop:
        body["stop"] = req.stop
    return body

"""The generation engine: one worker thread owns the model; jobs wait in an explicit FIFO queue and decode
together in a batch (continuous batching), starting from the prefix cache where a prompt repeats a recent one.

A job is submitted (its prompt fitted to the context at once, so callers learn about overflow before anything
streams) and waits its turn. Between decode steps the worker admits queued jobs while the batch has room: each
runs its prompt (only the part the prefix cache does not hold) in chunks, between the batch's decode steps or
inside them (mixed_step.py), or, when long, one decoder layer per step beside them (layered_prefill.py), then
joins the batch, whose every step gives each row one token. Jobs leave at eos, a stop string, their length, an
interrupt or a disconnect (the cancel flag, checked after every token) without disturbing the rest; what they
computed goes to the prefix cache.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import EngineBusy, NotReady  # noqa: F401 (defined in errors.py, importable here too)
from .budget import FittedPrompt, GenerationRequest, fit_prompt
from .contract import EngineState, load_in_background
from .jobs import Job
from .sizing import DEFAULT_PREFILL_CHUNK, PROMPT_PIECE, batch_size, context_that_fits, default_prompt_cache_mb

if TYPE_CHECKING:  # torch and transformers are imported when a model arrives, so HTTP can start without them
    from ..model.loader import LoadedModel
    from .batch import Batch
    from .layered_prefill import LayeredPiece
    from .prefix_cache import PrefixCache
    from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class Prefilling:
    """An admitted job whose prompt runs chunk by chunk between the batch's decode steps."""
    seq: Sequence
    cache: object  # DynamicCache, filled chunk by chunk
    todo: list[int]  # prompt ids not run yet
    followers: list[Sequence] = field(default_factory=list)  # same prompt, admitted with it: share its run
    piece: LayeredPiece | None = None  # a piece of the prompt on its way through the layers (layered_prefill.py)

    @property
    def rows(self) -> int:
        return 1 + len(self.followers)

WORKER_STOPPED = "the engine worker stopped (the server log says why); restart the server"


def release_expansion_memory() -> None:
    """Idle: the memory this worker kept for expanding quantized weights for prompts goes back (the next long
    prompt maps it again, once instead of for every matrix: model/cpu_quant.py's scratch)."""
    from ..model.cpu_quant import release_scratch  # (imported here: a front end runs without torch)

    release_scratch()


class Engine(EngineState):
    """The local engine (the GenerationEngine contract, engine/contract.py)."""

    constrained_decoding = True  # grammars and logprobs need the model's logits: only a local engine has them

    def __init__(self, max_queue: int = 8, reply_reserve: int = 512, max_batch: int = 0,
                 prompt_cache_mb: int | None = None, prefill_chunk: int = 0, prompt_cache_disk_mb: int = 0,
                 mixed_steps: bool | None = None, layered_from: int | None = None):
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk  # 0: chosen in attach() from the device
        self.mixed_steps = mixed_steps  # prompt chunks inside the decode step; None: chosen in attach()
        # prompt pieces of this many tokens or more run layer by layer beside decode steps; None: chosen in
        # attach(), 0: never
        self.layered_from = layered_from
        self.layered_piece = PROMPT_PIECE  # the most tokens of such a piece; set in attach()
        self.mixed_rows = 0  # the most rows such a pass may carry (0: none); set in attach()
        self.reply_reserve = reply_reserve
        self.max_batch = max_batch  # 0: chosen in attach() from the device and its free memory
        self.prompt_cache_mb = prompt_cache_mb  # None: chosen in attach() from the RAM
        self.prompt_cache_disk_mb = prompt_cache_disk_mb  # the prefix cache's disk tier (0: none)
        super().__init__()  # state "loading"; detail (progress, error) and notices for /health
        self.loaded: LoadedModel | None = None
        self.prefix_cache: PrefixCache | None = None
        self._pending: deque[Job] = deque()
        self._running: dict[str, Job] = {}  # admitted and not finished, in order of admission
        self._batch: Batch | None = None
        self._prefilling: deque[Prefilling] = deque()  # admitted, prompt not done yet; oldest first
        self._lock = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._mask = None  # added to logits: bans ids the tokenizer cannot show

    # -- lifecycle -------------------------------------------------------------------------------------------
    def load_in_background(self, loader: Callable[[Engine], LoadedModel],
                           on_ready: Callable[[LoadedModel], None] | None = None) -> threading.Thread:
        """Run `loader(engine)` on a thread (it may report progress through set_state) and start serving."""
        return load_in_background(self, loader, on_ready)

    def attach(self, loaded: LoadedModel) -> None:
        """Take a loaded model, size the batch and the prefix cache, and start the worker."""
        from .batch import Batch
        from .prefix_cache import PrefixCache
        from .sampling import vocabulary_mask

        self.loaded = loaded
        tok = loaded.tokenizer
        self._mask = vocabulary_mask(loaded.model.config.vocab_size, tok.first_special_id, tok.stop_ids,
                                     loaded.device)
        if self.prompt_cache_mb is None:
            self.prompt_cache_mb = default_prompt_cache_mb()
        self.prefix_cache = PrefixCache(self.prompt_cache_mb * 1024**2, disk=self._disk_cache(loaded))
        self._seed_prefix_cache(loaded)
        context = context_that_fits(loaded, self.prefix_cache.max_bytes)
        if context < loaded.plan.max_context:
            loaded.plan = replace(loaded.plan, max_context=context)
        self.max_batch = batch_size(loaded, self.max_batch, self.prefix_cache.max_bytes)
        self._batch = Batch(loaded.model)
        self.prefill_chunk = self.prefill_chunk or DEFAULT_PREFILL_CHUNK.get(loaded.device.type, 512)
        self.mixed_rows = self._mixed_rows(loaded)
        self.layered_from, self.layered_piece = self._layered(loaded)
        log.info("decoding up to %d requests together; prefix cache %d MB", self.max_batch, self.prompt_cache_mb)
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        self.set_state("ready")

    def _seed_prefix_cache(self, loaded: LoadedModel) -> None:
        """Run the chat template's start, which every new conversation shares, into the prefix cache: the first
        question after a start then reuses it as every later one does (on a CPU those are a few decode steps)."""
        import torch

        from ..model.forward import prefill
        from .batch import cache_from

        ids = loaded.tokenizer.conversation_start()
        if not self.prefix_cache.max_bytes or not ids:
            return
        try:
            with torch.inference_mode():
                cache = cache_from(loaded.model.config, [])
                prefill(loaded.model, ids, cache)
            self.prefix_cache.store(ids, [(layer.keys.to("cpu", copy=True), layer.values.to("cpu", copy=True))
                                          for layer in cache.layers], on_disk=False)
        except Exception:  # out of memory, say: the first question runs the template itself, as before
            log.warning("could not run the chat template's start into the prefix cache", exc_info=True)

    def _mixed_rows(self, loaded: LoadedModel) -> int:
        """Automatically (mixed_steps None) on the CPU, where a chunk and a step each cost about a read of the
        weights, as far as every row's logits stay those it gets apart (mixed_step.exact_rows); on a GPU the
        chunks are large and mixing was never measured: they run apart there."""
        from .mixed_step import exact_rows

        if self.mixed_steps is None:
            return exact_rows(loaded.model) if loaded.device.type == "cpu" else 0
        return sys.maxsize if self.mixed_steps else 0

    def _layered(self, loaded: LoadedModel) -> tuple[int, int]:
        """From how many prompt tokens a piece runs layer by layer, and its most tokens: as asked (pieces of
        PROMPT_PIECE), or automatically on the CPU from the start-up timings (layered_prefill.py); on a GPU
        prompt chunks are large already (sizing.DEFAULT_PREFILL_CHUNK): never."""
        from .layered_prefill import layered_from, pass_tokens

        if self.layered_from is not None:
            return self.layered_from or sys.maxsize, PROMPT_PIECE
        if loaded.device.type != "cpu":
            return sys.maxsize, PROMPT_PIECE
        piece = min(PROMPT_PIECE, pass_tokens(loaded.cpu_kernels, loaded.plan.bits,
                                              loaded.model.config.num_hidden_layers, self.prefill_chunk))
        return layered_from(loaded.model, self.prefill_chunk, piece), piece

    @property
    def state(self) -> str:
        """loading, downloading, ready or error; "error" also when the worker thread has died, so that /health
        and every route (503) say so instead of queueing work that nothing will run."""
        worker = self._worker
        if self._state == "ready" and worker is not None and not worker.is_alive() and not self._closed:
            self.set_state("error", error=WORKER_STOPPED)
        return self._state

    def _disk_cache(self, loaded: LoadedModel):
        """The prefix cache's disk tier in the model folder, for this model at this precision and kernel."""
        if not self.prompt_cache_disk_mb:
            return None
        from ..model.convert import fingerprint
        from ..model.loader import cache_format
        from .prefix_disk import DiskPrefixCache

        plan = loaded.plan
        kernels = loaded.cpu_kernels or {}
        stamp = {"model": fingerprint(loaded.path, cache_format(plan)), "device": plan.device, "bits": plan.bits,
                 "dtype": plan.dtype, "backend": plan.backend,
                 "int8": kernels.get("int8") if plan.bits == 8 else None}  # (4-bit: no int8 kernel runs)
        if plan.bits == 4 and kernels.get("int4", "torch") != "torch":  # (the stamps of earlier caches kept)
            stamp["int4"] = kernels["int4"]
        try:
            return DiskPrefixCache(loaded.path, stamp, self.prompt_cache_disk_mb * 1024**2)
        except OSError as exc:  # a read-only model folder: the memory tier alone
            log.warning("the prompt cache stays in memory only: %s", exc)
            return None

    @property
    def detail(self) -> dict:
        return self._detail

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._running.values():
                job.cancel()  # they end at their next token
            while self._pending:
                job = self._pending.popleft()
                job.cancel()
                job.finish_unstarted("interrupted")
            self._lock.notify_all()
        if self._worker:
            self._worker.join(timeout=30)

    # -- requests --------------------------------------------------------------------------------------------
    def fit(self, request: GenerationRequest) -> FittedPrompt:
        """Fit a request into the context (raises ContextOverflow)."""
        return fit_prompt(self._ready().tokenizer, request, self.max_context, self.reply_reserve)

    def submit(self, request: GenerationRequest) -> Job:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[Job]:
        """Queue several jobs at once (n choices): all or none, admitted in the same turn when the batch has
        room, so that identical prompts run once."""
        return self.enqueue(*[Job(request=request, prompt=self.fit(request)) for request in requests])

    def enqueue(self, *jobs: Job) -> list[Job]:
        """Queue jobs whose prompts are already fitted (raises EngineBusy when the queue has no room for all)."""
        with self._lock:
            if len(self._pending) + len(jobs) > self.max_queue:
                raise EngineBusy(f"the server is busy: {len(self._pending)} requests are already waiting; "
                                 f"try again in a moment")
            self._pending.extend(jobs)
            self._lock.notify()
        return list(jobs)

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the job `job_id`, queued or running, or without an id every running job (the seed's global stop).
        False when there was none."""
        with self._lock:
            if job_id is None:
                for job in self._running.values():
                    job.cancel()
                return bool(self._running)
            if job_id in self._running:
                self._running[job_id].cancel()
                return True
            for job in self._pending:
                if job.id == job_id:
                    self._pending.remove(job)
                    job.cancel()
                    job.finish_unstarted("interrupted")
                    return True
        return False

    @property
    def max_context(self) -> int | None:
        return self.loaded.plan.max_context if self.loaded else None

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def queued_ids(self) -> list[str]:
        """Waiting jobs, the next first."""
        with self._lock:
            return [job.id for job in self._pending]

    @property
    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    @property
    def running_id(self) -> str | None:
        """The longest-running job (None when idle)."""
        return next(iter(self.running_ids), None)

    def _ready(self) -> LoadedModel:
        if self.state != "ready" or self.loaded is None:
            raise NotReady(f"the model is not ready ({self.state})")
        return self.loaded

    # -- the worker ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while self._turn():
                    pass
        except BaseException:  # nothing should get here (each turn catches Exception): say so where it shows
            log.critical("the engine worker stopped", exc_info=True)
            self.set_state("error", error=WORKER_STOPPED)
            self._fail_all(WORKER_STOPPED, queued_too=True)

    def _turn(self) -> bool:
        """Admit what fits, run one chunk of a waiting prompt (or one layer of a long one), then one decode
        step. False once the engine is closed and nothing runs."""
        with self._lock:
            if not self._pending and not self._busy():
                release_expansion_memory()
            while not self._pending and not self._busy() and not self._closed:
                self._lock.wait()
            if self._closed and not self._busy():
                return False
            admitted = []
            while self._pending and self._rows_taken() + len(admitted) < self.max_batch:
                job = self._pending.popleft()
                self._running[job.id] = job
                admitted.append(job)
        try:
            for job in admitted:
                self._start(job)
            waiting = self._prefilling[0] if self._prefilling else None
            if waiting and (waiting.piece is not None or self._by_layers(waiting)):
                self._layer_pass(waiting)
                if self._batch.rows:
                    self._step()
            elif waiting and self._batch.rows and (mixed := self._mixed_chunk(waiting)):
                self._chunk_and_step(mixed)
            else:
                if waiting:
                    self._prefill_chunk()
                if self._batch.rows:
                    self._step()
        except Exception as exc:  # a fault outside one job's own steps: the running jobs fail, the engine goes on
            log.error("engine step failed", exc_info=exc)
            self._fail_all(f"{type(exc).__name__}: {exc}")
        return True

    def _busy(self) -> bool:
        return bool(self._batch.rows or self._prefilling)

    def _rows_taken(self) -> int:
        return len(self._batch) + sum(waiting.rows for waiting in self._prefilling)

    def _fail_all(self, error: str, queued_too: bool = False) -> None:
        """End every running job (and the queued ones too) with `error` and empty the batch."""
        self._batch.remove(list(range(len(self._batch))))
        self._prefilling.clear()
        with self._lock:
            jobs = list(self._running.values())
            self._running.clear()
            if queued_too:
                jobs += self._pending
                self._pending.clear()
        for job in jobs:
            if job.result is None:
                job.finish_unstarted("error", error=error)

    def _start(self, job: Job) -> None:
        """Look up what the prefix cache holds of a job's prompt; the rest waits to run (`_prefill_chunk`)."""
        from .batch import cache_from
        from .sequence import Sequence

        if job.cancelled.is_set():
            job.finish_unstarted("interrupted")
            self._forget(job)
            return
        ids = job.prompt.ids
        if job.request.echo_logprobs:  # every prompt token is scored: none may come from the cache
            cached, tensors = 0, None
        else:
            cached, tensors = self.prefix_cache.lookup(ids, self.loaded.device)
        seq = Sequence(job, self.loaded.tokenizer, self._mask, cached_tokens=cached)
        twin = next((w for w in self._prefilling if w.seq.ids == ids and len(w.todo) == len(ids) - cached
                     and not job.request.echo_logprobs and not w.seq.job.request.echo_logprobs), None)
        if twin is not None:  # the same prompt, not started: run it once for both (n choices, say)
            twin.followers.append(seq)
            return
        self._prefilling.append(Prefilling(seq, cache_from(self.loaded.model.config, tensors or []), ids[cached:]))

    def _prefill_chunk(self) -> None:
        """Run the next chunk of the oldest waiting prompt: `prefill_chunk` tokens while other replies decode (so
        a long prompt does not stall them), PROMPT_PIECE when none do (so its activations stay bounded). After
        its last chunk the job samples its first token and joins the batch, unless that token already ends it."""
        from ..model.forward import prefill

        waiting = self._prefilling[0]
        seq = waiting.seq
        if self._drop_if_cancelled(waiting):
            return
        size = self.prefill_chunk if self._batch.rows else PROMPT_PIECE
        chunk, waiting.todo = waiting.todo[:size], waiting.todo[size:]
        try:
            logits = prefill(self.loaded.model, chunk, waiting.cache, every_position=seq.prompt_score is not None)
            if seq.prompt_score is not None:
                logits = seq.prompt_score.add(chunk, logits)
        except Exception as exc:  # out of memory or a model error: these jobs fail, the engine goes on
            self._prefilling.popleft()
            self._fail([seq, *waiting.followers], exc)
            return
        self._prompt_ran(waiting, logits)

    def _by_layers(self, waiting: Prefilling) -> bool:
        """Whether this prompt's next piece runs layer by layer beside the batch's decode steps: when others
        decode, the piece is long enough (`layered_from`) and not every position is scored (echo logprobs)."""
        piece = min(len(waiting.todo), self.layered_piece)
        return bool(self._batch.rows) and waiting.seq.prompt_score is None and piece >= self.layered_from

    def _layer_pass(self, waiting: Prefilling) -> None:
        """Run the prompt's current piece (starting the next one, `layered_piece` tokens at most) through its
        next decoder layer; after the last layer the piece has run (`_prompt_ran`)."""
        from .layered_prefill import LayeredPiece

        if self._drop_if_cancelled(waiting):
            return
        try:
            if waiting.piece is None:
                size = self.layered_piece
                piece, waiting.todo = waiting.todo[:size], waiting.todo[size:]
                waiting.piece = LayeredPiece(self.loaded.model, piece, waiting.cache)
            logits = waiting.piece.run_layer()
        except Exception as exc:  # out of memory or a model error: these jobs fail, the engine goes on
            self._prefilling.popleft()
            self._fail([waiting.seq, *waiting.followers], exc)
            return
        if logits is not None:
            waiting.piece = None
            self._prompt_ran(waiting, logits)

    def _drop_if_cancelled(self, waiting: Prefilling) -> bool:
        """End the leading job of a waiting prompt if it was interrupted or disconnected while its prompt ran."""
        seq = waiting.seq
        if not seq.job.cancelled.is_set():
            return False
        seq.reason = "interrupted"
        self._end(seq, None)
        if waiting.followers:  # the others still want the prompt: the next one leads
            waiting.seq = waiting.followers.pop(0)
        else:
            self._prefilling.popleft()
        return True

    def _mixed_chunk(self, waiting: Prefilling) -> int:
        """How many of this prompt's tokens run inside the batch's next decode step (mixed_step.py); 0: its
        chunk runs apart. The pass carries `prefill_chunk` rows in all, the prompt at least half of them (its
        cost stays what a chunk alone costs, sizing.DEFAULT_PREFILL_CHUNK); what is left of a prompt, up to
        `prefill_chunk` tokens, runs in one pass (a prompt split elsewhere than alone gets other roundings in
        attention on some CPUs); never more rows than `mixed_rows`, and not for a prompt whose every position
        is scored (echo logprobs)."""
        if waiting.seq.prompt_score is not None:
            return 0
        rows, left = len(self._batch), len(waiting.todo)
        size = left if left <= self.prefill_chunk else max(self.prefill_chunk - rows, self.prefill_chunk // 2)
        return size if rows + size <= self.mixed_rows else 0

    def _chunk_and_step(self, size: int) -> None:
        """One decode step of the batch and the next `size` tokens of the oldest waiting prompt, in one pass."""
        waiting = self._prefilling[0]
        if self._drop_if_cancelled(waiting):
            if self._batch.rows:
                self._step()
            return
        chunk, waiting.todo = waiting.todo[:size], waiting.todo[size:]
        try:
            logits, prompt_logits = self._batch.step_with_chunk(chunk, waiting.cache)
        except Exception as exc:  # out of memory or a model error: the jobs of both fail, the engine goes on
            self._prefilling.popleft()
            self._fail_batch(exc, [waiting.seq, *waiting.followers])
            return
        self._advance_batch(logits)
        self._prompt_ran(waiting, prompt_logits)

    def _prompt_ran(self, waiting: Prefilling, logits) -> None:
        """After a chunk of `waiting`'s prompt: when it was the last, its jobs sample their first token and join
        the batch (or end there)."""
        from .batch import cache_from

        seq = waiting.seq
        if waiting.todo:
            return
        self._prefilling.popleft()
        prompt = [(layer.keys, layer.values) for layer in waiting.cache.layers]
        for i, row in enumerate([seq, *waiting.followers]):
            # each row its own cache object over the same tensors (nothing writes into them in place; the
            # batch may take the first one's object as its own)
            cache = waiting.cache if i == 0 else cache_from(self.loaded.model.config, prompt)
            try:
                goes_on = row.advance(logits)
            except Exception as exc:  # sampling or reporting failed: this job fails, the engine goes on
                self._fail([row], exc)
                continue
            if goes_on:
                self._batch.add(row, cache)
            else:
                self._end(row, [(layer.keys.cpu(), layer.values.cpu()) for layer in cache.layers])

    def _step(self) -> None:
        """One decode step for every row; rows that end leave the batch."""
        try:
            logits = self._batch.step()
        except Exception as exc:  # out of memory or a model error: the batch's jobs fail, the engine goes on
            self._fail_batch(exc)
            return
        self._advance_batch(logits)

    def _fail_batch(self, exc: Exception, others: list | None = None) -> None:
        """Every row of the batch (and `others`) fails with `exc`; the batch is empty after."""
        rows = list(self._batch.rows)
        self._batch.remove(list(range(len(rows))))
        self._fail([*rows, *(others or [])], exc)

    def _advance_batch(self, logits) -> None:
        """Each row samples its next token from its logits [rows, vocab]; rows that end leave the batch."""
        batch = self._batch
        ended, failed = [], []
        for i, seq in enumerate(batch.rows):
            try:
                if not seq.advance(logits[i]):
                    ended.append(i)
            except Exception as exc:  # one row's sampling or reporting failed: that job fails, the rest go on
                failed.append(i)
                self._fail([seq], exc)
        for i in ended:
            self._end(batch.rows[i], batch.row_tensors(i))
        batch.remove(ended + failed)

    def _end(self, seq, tensors: list | None) -> None:
        """Keep what the sequence computed for a later prompt that starts the same way, then report the end
        (in this order, so that a client's next turn finds it)."""
        try:
            if tensors is not None:  # (None: the prompt did not finish running)
                self.prefix_cache.store(seq.ids, tensors)
        except Exception:  # out of memory, say: the reply is still good, only its reuse is lost
            log.warning("could not keep job %s in the prefix cache", seq.job.id, exc_info=True)
        try:
            seq.finish()
        except Exception as exc:
            self._fail([seq], exc)
            return
        self._forget(seq.job)

    def _fail(self, rows: list, exc: Exception) -> None:
        import torch

        log.error("generation failed for %s", ", ".join(seq.job.id for seq in rows), exc_info=exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for seq in rows:
            error = f"{type(exc).__name__}: {exc}"
            try:
                seq.finish(error=error)
            except Exception:  # the decoder itself broke: end the job without its last text
                if seq.job.result is None:
                    seq.job.finish_unstarted("error", error=error)
            self._forget(seq.job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._running.pop(job.id, None)

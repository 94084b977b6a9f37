"""Between HTTP and the engine: submit a job, follow its events while watching the client, frame SSE, log it.

A client that goes away cancels its job, streamed or not: waitress reports the disconnect through
`waitress.client_disconnected` (checked between events and while a job waits in the queue), and a write to a
closed socket ends the response generator, whose cleanup interrupts the job.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable, Iterator

from flask import Response

from ..engine import EngineBusy, Finished, Job, NotReady, Update
from ..engine.budget import ContextOverflow, GenerationRequest
from ..engine.contract import GenerationEngine
from ..errors import UpstreamRejected
from .validation import ApiError

log = logging.getLogger("server.requests")
chatlog = logging.getLogger("server.chatlog")  # full texts; a rotating file set up by run.py
chatlog.propagate = False

POLL_SECONDS = 0.25  # how often a waiting stream checks whether its client is still there
RETRY_AFTER = {"Retry-After": "5"}


def submit(engine: GenerationEngine, request: GenerationRequest) -> Job:
    """Queue a job, or raise the ApiError that tells the client why not."""
    return submit_all(engine, [request])[0]


def submit_all(engine: GenerationEngine, requests: list[GenerationRequest]) -> list[Job]:
    """Queue several jobs at once (n choices), all or none, or raise the ApiError that tells the client why."""
    try:
        return engine.submit_all(requests)
    except NotReady:
        raise ApiError(503, not_ready_message(engine), code="model_not_ready", headers=RETRY_AFTER) from None
    except EngineBusy as exc:
        raise ApiError(429, str(exc), code="server_busy", headers=RETRY_AFTER) from None
    except UpstreamRejected as exc:
        raise ApiError(502, f"the upstream engine refused the request: {exc}", code="upstream_rejected") from None
    except ContextOverflow as exc:
        raise ApiError(413, str(exc), code="context_length_exceeded", param="messages",
                       prompt_tokens=exc.prompt_tokens, limit=exc.limit, max_context=exc.max_context) from None


def not_ready_message(engine: GenerationEngine) -> str:
    if engine.state == "error":
        return f"the model is not available: {engine.detail.get('error', 'see the server log')}"
    if engine.state == "unavailable":  # a front end whose upstream engines do not answer
        return f"{engine.detail.get('error')}; try again in a few seconds"
    progress = engine.detail.get("progress")
    done = f" ({progress:.0%} done)" if isinstance(progress, float) else ""
    return f"the model is still {engine.state}{done}; try again in a few seconds"


def tokenizer_of(engine: GenerationEngine):
    if engine.loaded is None:  # (a front end counts tokens also while its upstreams are away)
        raise ApiError(503, not_ready_message(engine), code="model_not_ready", headers=RETRY_AFTER)
    return engine.loaded.tokenizer


def follow(engine: GenerationEngine, job: Job, disconnected: Callable[[], bool], route: str) -> Iterator[Update | Finished]:
    """The job's events; interrupts the job when the client disconnects or stops reading. Every job is logged
    when it ends, also one whose client went away (finish reason `interrupted`)."""
    job.when_finished(lambda finished: log_finished(route, job, finished))
    try:
        while True:
            try:
                event = job.next_event(timeout=POLL_SECONDS)
            except queue.Empty:  # still queued, or a slow token: is anyone still listening?
                if disconnected():
                    engine.interrupt(job.id)
                continue
            yield event
            if isinstance(event, Finished):
                return
            if disconnected():
                engine.interrupt(job.id)
    finally:
        if job.result is None:  # the response was closed early: the client is gone
            engine.interrupt(job.id)


def follow_all(engine: GenerationEngine, jobs: list[Job], disconnected: Callable[[], bool],
               route: str) -> Iterator[tuple[int, Update | Finished]]:
    """Several jobs' events (n choices) as they come, each with its job's index; like `follow`, a client that
    goes away interrupts them all."""
    if len(jobs) == 1:
        yield from ((0, event) for event in follow(engine, jobs[0], disconnected, route))
        return
    for job in jobs:
        job.when_finished(lambda finished, job=job: log_finished(route, job, finished))
    running, checked_at = set(range(len(jobs))), time.monotonic()
    try:
        while running:
            quiet = True
            for i in sorted(running):
                try:
                    event = jobs[i].next_event(timeout=0)
                except queue.Empty:
                    continue
                quiet = False
                yield i, event
                if isinstance(event, Finished):
                    running.discard(i)
            if quiet:
                time.sleep(0.005)
            if time.monotonic() - checked_at > POLL_SECONDS:
                checked_at = time.monotonic()
                if disconnected():
                    for i in running:
                        engine.interrupt(jobs[i].id)
    finally:
        for job in jobs:
            if job.result is None:
                engine.interrupt(job.id)


def wait_all(engine: GenerationEngine, route: str, jobs: list[Job], disconnected: Callable[[], bool]) -> list[Finished]:
    """`wait_for` for several jobs (n choices): every one finished, or the 503 of the first that failed."""
    for _ in follow_all(engine, jobs, disconnected, route):
        pass
    for job in jobs:
        if job.result.finish_reason == "error":
            raise ApiError(503, f"generation failed: {job.result.error}; try a shorter input or try again",
                           code="generation_failed", headers=RETRY_AFTER)
    return [job.result for job in jobs]


def wait_for(engine: GenerationEngine, route: str, job: Job, disconnected: Callable[[], bool]) -> Finished:
    """The finished job of a non-streaming request; a failed generation becomes a 503 the client can retry.

    The client may leave while it waits (a timeout, a cancelled task, an SDK's retry): waitress then reports the
    closed connection, and the job is interrupted instead of generating for nobody."""
    return wait_all(engine, route, [job], disconnected)[0]


def appended(sent: str, now: str) -> str:
    """What a reply gained since `sent` was streamed: streamed text only ever grows, so a reply rewritten
    otherwise (rare: a cleaned placeholder) adds nothing to a delta stream."""
    return now[len(sent):] if now.startswith(sent) else ""


def client_watcher(environ) -> Callable[[], bool]:
    return environ.get("waitress.client_disconnected") or (lambda: False)


def sse(payload, event: str | None = None) -> bytes:
    """One server-sent event: optional name, one data line of compact UTF-8 JSON, blank line."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode("utf-8")


def event_stream(events, *jobs: Job, content_type: str = "text/event-stream; charset=utf-8") -> Response:
    """A streamed response (SSE by default) that names its (first) job in X-Job-Id; nothing in between buffers
    it, and a client that stops reading cannot hold the thread or the memory (`paced`)."""
    from flask import request

    from .app import current_engine, current_settings

    engine = current_engine()

    def stop():
        for job in jobs:
            engine.interrupt(job.id)

    body = paced(events, request.environ, stop, current_settings().write_timeout)
    return Response(body, content_type=content_type,
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Id": jobs[0].id})


UNSENT_LIMIT = 256 * 1024  # bytes waiting for a client before the stream waits for it to read


def paced(chunks, environ: dict, stop: Callable[[], None], write_timeout: float) -> Iterator[bytes]:
    """`chunks`, handed to waitress only while the client reads: with more than UNSENT_LIMIT bytes unsent, wait
    for the client (waitress's own write would block the thread for good); after `write_timeout` seconds without
    progress, stop the job and end the response, which frees the thread (the connection closes later as idle).
    Meanwhile the job's queue keeps only the newest updates (engine/jobs.EventQueue)."""
    channel = getattr(environ.get("waitress.client_disconnected"), "__self__", None)
    unsent = (lambda: channel.total_outbufs_len) if channel is not None else (lambda: 0)
    try:
        for chunk in chunks:
            waited_since, before = None, unsent()
            while unsent() > UNSENT_LIMIT:
                now = time.monotonic()
                if unsent() < before:  # it reads, if slowly
                    waited_since, before = now, unsent()
                waited_since = waited_since or now
                if now - waited_since > write_timeout or not channel.connected:
                    log.warning("a client stopped reading for %.0f s; its job is stopped", write_timeout)
                    stop()
                    return
                time.sleep(0.05)
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # runs the generator's own cleanup (follow() interrupts a job whose client is gone)


def summary(job: Job, finished: Finished) -> dict:
    """What the `done` event reports."""
    return {"finish_reason": finished.finish_reason, "id": job.id, "prompt_tokens": finished.prompt_tokens,
            "cached_tokens": finished.cached_tokens, "completion_tokens": finished.completion_tokens,
            "dropped_rounds": finished.dropped_rounds, "seconds": round(finished.seconds, 3)}


def log_finished(route: str, job: Job, finished: Finished) -> None:
    """One console line per request; the full query and reply only in the chat log."""
    ttft = finished.first_token_seconds
    decode_time = finished.seconds - (ttft or 0)
    rate = (finished.completion_tokens - 1) / decode_time if finished.completion_tokens > 1 and decode_time > 0 else 0
    log.info("job %s %s prompt=%d cached=%d reply=%d dropped=%d ttft=%s tok/s=%.1f finish=%s%s", job.id, route,
             finished.prompt_tokens, finished.cached_tokens, finished.completion_tokens, finished.dropped_rounds,
             f"{ttft:.2f}s" if ttft is not None else "-", rate, finished.finish_reason,
             f" error={finished.error}" if finished.error else "")
    chatlog.info(json.dumps({"id": job.id, "route": route, "query": job.request.query,
                             "history_rounds": len(job.request.history), "answer_prefix": job.request.answer_prefix,
                             "reply": finished.text, "finish_reason": finished.finish_reason},
                            ensure_ascii=False))

"""The seed's HTTP API, kept exactly (`/`, `/stream`, `/interrupt`, `/tokenize`), and its successor `/generate`.

Data path of a chat request: JSON body -> validated GenerationRequest -> engine queue -> model -> SSE events.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..engine import Finished, Job, Update
from ..engine.budget import GenerationRequest
from .app import current_engine
from .relay import client_watcher, event_stream, follow, sse, submit, summary, tokenizer_of, wait_for
from .structured import checked, response_format_grammar
from .validation import (
    ApiError,
    flag,
    history_pairs,
    json_body,
    number,
    parse_json,
    penalty_fields,
    refuse_unknown,
    sampling_fields,
    shown,
    text,
)

bp = Blueprint("seed", __name__)

# The original server's sampling defaults.
TOP_P, TEMPERATURE = 0.7, 1.0


CHAT_FIELDS = {"query", "answer_prefix", "history", "max_length", "top_p", "temperature", "top_k", "min_p",
               "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format", "delta", "stream"}


def chat_request(body: dict) -> GenerationRequest:
    """The seed's fields (query, answer_prefix, max_length, history, top_p, temperature), the sampling knobs, and
    the framing flags `delta` (/stream) and `stream` (/generate)."""
    refuse_unknown(body, CHAT_FIELDS)
    prefix = text(body, "answer_prefix", default="")
    response_format = body.get("response_format")
    if isinstance(response_format, str):  # GET /generate passes objects as JSON strings
        response_format = parse_json(response_format, "'response_format'", param="response_format")
    grammar = checked(response_format_grammar(response_format), current_engine(), prefix)
    return GenerationRequest(grammar=grammar,
        query=text(body, "query", required=True, allow_empty=False),
        answer_prefix=prefix,
        history=history_pairs(body),
        max_length=number(body, "max_length", None, integer=True, low=0, low_open=True),
        **sampling_fields(body, TOP_P, TEMPERATURE), **penalty_fields(body),
    )


@bp.get("/")
def index():
    return jsonify({"message": "Server started", "success": True})


@bp.post("/stream")
def stream():
    body = json_body(request)
    chat = chat_request(body)
    deltas = flag(body, "delta", False)  # our extension: only what changed, not the whole reply twice per event
    eng = current_engine()
    job = submit(eng, chat)
    # The rounds the model saw: as sent when they fit (the original's echo, byte for byte), without the oldest
    # rounds dropped to fit the context otherwise, so that a huge history is not sent back in every event (a
    # 1 MB request made a 217 MB reply). The done event says how many rounds were dropped.
    history = [list(pair) for pair in chat.history[job.prompt.dropped_rounds:]]
    watch = client_watcher(request.environ)

    def events():
        shown = ""
        for event in follow(eng, job, watch, "/stream"):
            if isinstance(event, Update):
                if deltas:
                    yield sse(change(shown, event.text))
                    shown = event.text
                else:
                    yield sse([event.text, history + [[chat.query, event.text]]])
            else:
                yield finish_event(job, event)

    return event_stream(announce(job, events()), job)


def change(before: str, after: str) -> dict:
    """A delta event: the text to append, or (rarely: the reply is cleaned as a whole, e.g. a placeholder
    filled in) the whole new text."""
    return {"delta": after[len(before):]} if after.startswith(before) else {"text": after}


def finish_event(job: Job, finished: Finished) -> bytes:
    if finished.finish_reason == "error":
        return sse({"message": f"generation failed: {finished.error}", "id": job.id}, event="error")
    return sse(summary(job, finished), event="done")


def announce(job: Job, events):
    """Open the stream with an SSE comment naming the job. waitress sends the headers (X-Job-Id) with the first
    non-empty chunk, so a client learns the id at once and can interrupt a job that still waits in the queue.
    SSE parsers ignore comment lines."""
    yield f": job {job.id}\n\n".encode()
    yield from events


@bp.post("/interrupt")
def interrupt():
    body = json_body(request) if request.get_data(cache=True).strip() else {}
    job_id = text(body, "id")
    if job_id is None:  # no body, no "id", or "id": null: the original's stop of every running job
        current_engine().interrupt()
    elif not current_engine().interrupt(job_id):
        raise ApiError(404, f"no queued or running job has the id {shown(job_id)}; it may have finished already")
    return jsonify({"message": "OK", "success": True})


@bp.post("/tokenize")
def tokenize():
    body = json_body(request)
    value = text(body, "text", required=True)
    tokenizer = tokenizer_of(current_engine())
    pieces = tokenizer.pieces(value)
    answer = {"len": len(pieces)}
    if flag(body, "return_tokens", False):
        answer["tokens"] = pieces
    return jsonify(answer)


@bp.route("/generate", methods=["GET", "POST"])
def generate():
    """The dedicated client's endpoint: `data: {"response": reply_so_far}` events, or plain text."""
    body = request.args.to_dict() if request.method == "GET" else json_body(request)
    chat = chat_request(body)
    streaming = flag(body, "stream", False)
    eng = current_engine()
    job = submit(eng, chat)
    if not streaming:
        finished = wait_for(eng, "/generate", job, client_watcher(request.environ))
        # the plain-text body cannot say how it ended: the header does (stop, length or interrupted)
        return Response(finished.text, content_type="text/plain; charset=utf-8",
                        headers={"X-Job-Id": job.id, "X-Finish-Reason": finished.finish_reason})

    watch = client_watcher(request.environ)

    def events():
        # only unnamed data events: that client parses every chunk as one {"response": ...} event
        for event in follow(eng, job, watch, "/generate"):
            if isinstance(event, Update):
                yield sse({"response": event.text})

    return event_stream(events(), job)

"""OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions` on the same engine and queue.

Messages map onto ChatGLM2's rounds: system (and developer) messages are folded into the first user turn,
user/assistant pairs become history, and a trailing assistant message is a prefill: it becomes the answer
prefix, and the returned content continues it without repeating it.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from ..engine import Finished, Job, Update
from ..engine.budget import GenerationRequest
from ..model.tokenizer import clean_continuation
from .app import current_engine, current_settings
from .relay import client_watcher, event_stream, follow, sse, submit, tokenizer_of, wait_for
from .structured import checked, response_format_grammar
from .validation import ApiError, flag, json_body, logit_bias, number, penalty_fields, refuse_unknown, sampling_fields

bp = Blueprint("openai", __name__, url_prefix="/v1")

TOP_P, TEMPERATURE = 0.7, 1.0  # the seed's defaults, which suit ChatGLM2 better than OpenAI's top_p=1
MAX_STOPS = 4
SAMPLING = {"temperature", "top_p", "seed", "stop", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias"}
CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
               "response_format", *SAMPLING}
# Accepted without effect: they describe the caller or OpenAI's own storage and billing, not the reply.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


def model_id() -> str:
    """The model's name (`chatglm2-6b`): the last part of its hub repository. A request may name any model:
    there is one, and clients configured for another name (an alias) reach it too."""
    return current_settings().repo.rstrip("/").rsplit("/", 1)[-1] or "chatglm2-6b"


def model_card() -> dict:
    return {"id": model_id(), "object": "model", "created": 1687132800,
            "owned_by": current_settings().repo.split("/", 1)[0] if "/" in current_settings().repo else "THUDM"}


@bp.get("/models")
def models():
    return jsonify({"object": "list", "data": [model_card()]})


@bp.get("/models/<path:name>")
def model(name: str):
    return jsonify(model_card())  # any name is an alias of the one model


def message_text(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text can be used
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def to_rounds(messages) -> tuple[str, list[tuple[str, str]], str]:
    """(query, history, answer_prefix) from OpenAI messages."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    system, turns = [], []  # turns: [role, text], consecutive same roles merged
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", param="messages")
        role = message["role"]
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported: use system, user or assistant",
                           param="messages")
        text = message_text(message, i)
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    if not any(role == "user" for role, _ in turns):
        raise ApiError(400, "'messages' must contain at least one user message", param="messages")
    prefix = turns.pop()[1] if turns[-1][0] == "assistant" else ""
    query = turns.pop()[1]
    history, pending = [], None
    for role, text in turns:
        if role == "user":
            pending = text
        else:
            history.append((pending or "", text))
            pending = None
    if system:  # ChatGLM2 has no system role: the instructions lead the first user turn
        instructions = "\n\n".join(system)
        if history:
            history[0] = (f"{instructions}\n\n{history[0][0]}", history[0][1])
        else:
            query = f"{instructions}\n\n{query}"
    return query, history, prefix


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return [s for s in stops if s]


def completion_request(body: dict) -> GenerationRequest:
    refuse_unknown(body, CHAT_FIELDS, IGNORED)
    n = number(body, "n", 1, integer=True)
    if n != 1:
        raise ApiError(400, f"'n' must be 1: this server generates one choice per request, not {n}", param="n")
    query, history, prefix = to_rounds(body.get("messages"))
    grammar = checked(response_format_grammar(body.get("response_format")), current_engine(), prefix)
    max_tokens = number(body, "max_completion_tokens", None, integer=True, low=1)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", None, integer=True, low=1)
    return GenerationRequest(
        query=query, history=history, answer_prefix=prefix, max_new_tokens=max_tokens,
        seed=number(body, "seed", None, integer=True, low=-2**63, high=2**64 - 1),  # what torch's generator takes
        stop=stop_strings(body),
        **sampling_fields(body, TOP_P, TEMPERATURE), **penalty_fields(body), **bias_field(body), grammar=grammar,
    )


def bias_field(body: dict) -> dict:
    if body.get("logit_bias") is None:
        return {}
    return {"logit_bias": logit_bias(body, tokenizer_of(current_engine()).first_special_id)}


def submit_completion(chat: GenerationRequest) -> Job:
    engine = current_engine()
    try:
        return submit(engine, chat)
    except ApiError as error:
        if error.code == "context_length_exceeded":  # OpenAI answers an overlong prompt with 400
            error.status = 400
        raise


def finish_reason(finished: Finished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens}}


@bp.post("/chat/completions")
def chat_completions():
    body = json_body(request)
    chat = completion_request(body)
    streaming = flag(body, "stream", False)
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    include_usage = streaming and flag(options, "include_usage", False)
    job = submit_completion(chat)
    prefilled = bool(chat.answer_prefix)
    head = {"id": f"chatcmpl-{job.id}", "created": int(time.time()), "model": model_id()}
    if not streaming:
        finished = wait_for(current_engine(), "/v1/chat/completions", job, client_watcher(request.environ))
        return jsonify({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": clean_continuation(finished.generated, prefilled)},
            "logprobs": None, "finish_reason": finish_reason(finished)}], "usage": usage(finished)})

    engine = current_engine()
    watch = client_watcher(request.environ)

    def chunk(delta: dict, reason=None, **extra) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        usage_field = {"usage": None} if include_usage else {}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **usage_field, **extra})

    def events():
        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        for event in follow(engine, job, watch, "/v1/chat/completions"):
            if isinstance(event, Update):
                content = clean_continuation(event.generated, prefilled)
                if content.startswith(sent) and len(content) > len(sent):  # deltas only ever append
                    yield chunk({"content": content[len(sent):]})
                    sent = content
                continue
            if event.finish_reason == "error":
                yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                     "param": None, "code": "generation_failed"}})
            else:
                yield chunk({}, finish_reason(event))
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(event)})
        yield b"data: [DONE]\n\n"

    return event_stream(events(), job)

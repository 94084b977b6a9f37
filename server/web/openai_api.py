"""OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions` on the same engine and queue.

Messages map onto ChatGLM2's rounds (web/messages.py); a trailing assistant message is a prefill: the returned
content continues it without repeating it. Legacy text completions are web/completions_api.py.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from ..engine import Finished, Job, Update
from ..engine.budget import GenerationRequest
from ..model.tokenizer import clean_continuation
from .app import current_engine, current_settings, prompt_family
from .openai_fields import (
    IGNORED,
    MAX_TOP_LOGPROBS,
    SAMPLING,
    chat_logprobs,
    choice_count,
    finish_reason,
    model_id,
    sampling_request,
    submit_choices,
    usage,
)
from .relay import appended, client_watcher, event_stream, follow_all, sse, tokenizer_of, wait_all
from .structured import checked, needs_local_engine, response_format_grammar
from .tool_calls import StreamedCalls, ToolUse, chat_with_tools, reply_message
from .validation import ApiError, flag, json_body, number, refuse_unknown

bp = Blueprint("openai", __name__, url_prefix="/v1")

CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "stream", "stream_options",
               "response_format", "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs",
               *SAMPLING}
ROUTE = "/v1/chat/completions"


def model_card() -> dict:
    repo = current_settings().repo
    return {"id": model_id(), "object": "model", "created": 1687132800,
            "owned_by": repo.split("/", 1)[0] if "/" in repo else "THUDM"}


@bp.get("/models")
def models():
    return jsonify({"object": "list", "data": [model_card()]})


@bp.get("/models/<path:name>")
def model(name: str):
    return jsonify(model_card())  # any name is an alias of the one model


def chat_request(body: dict) -> tuple[GenerationRequest, ToolUse | None]:
    """The request, and the tools it offers (then the reply may be tool calls)."""
    refuse_unknown(body, CHAT_FIELDS, IGNORED)
    tools, (system, query, history, prefix) = chat_with_tools(body.get("messages"), body, prompt_family())
    grammar = response_format_grammar(body.get("response_format"))
    if tools is not None:
        if grammar is not None:
            raise ApiError(400, "'response_format' and 'tools' cannot be combined: a reply is either a call or "
                                "the formatted answer", param="response_format")
        grammar = checked(tools.grammar, current_engine(), prefix, param="tools")
    else:
        grammar = checked(grammar, current_engine(), prefix)
    max_tokens = number(body, "max_completion_tokens", None, integer=True, low=1)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", None, integer=True, low=1)
    return GenerationRequest(query=query, history=history, answer_prefix=prefix, system=system, max_new_tokens=max_tokens,
                             grammar=grammar, logprobs=logprobs_field(body), **sampling_request(body)), tools


def logprobs_field(body: dict) -> int | None:
    """`logprobs` (bool) and `top_logprobs` (0-20) -> how many alternatives to report per token (None: off)."""
    top = number(body, "top_logprobs", None, integer=True, low=0, high=MAX_TOP_LOGPROBS)
    if not flag(body, "logprobs", False):
        if top is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    needs_local_engine(current_engine(), "logprobs")
    return top or 0


class ChoiceStream:
    """One choice of a streamed chat completion: its new content (or tool calls) and logprobs as deltas."""

    def __init__(self, index: int, job: Job, prefilled: bool, tools: ToolUse | None, tokenizer):
        self.index, self.job, self.prefilled, self.tokenizer = index, job, prefilled, tokenizer
        self.calls = StreamedCalls(tools.format) if tools else None
        self.sent = ""  # content sent so far
        self.scored = 0  # tokens whose logprobs were sent

    def choices(self, event: Update | Finished) -> list[dict]:
        """The choice objects of the chunks this event makes (each new content piece or call, then the end)."""
        content = clean_continuation(event.generated, self.prefilled)
        out = []
        for delta in self.calls.deltas(content) if self.calls else [{"content_upto": content}]:
            if "content_upto" not in delta:
                out.append(self.choice(delta))
                continue
            new = appended(self.sent, delta["content_upto"])
            if new:
                out.append(self.choice({"content": new}, self.logprobs(event.completion_tokens)))
                self.sent += new
        if isinstance(event, Finished):
            called = self.calls is not None and self.calls.called
            rest = self.logprobs(event.completion_tokens)  # tokens that showed no text (trailing spaces)
            out.append(self.choice({}, rest if rest and rest["content"] else None,
                                   reason="tool_calls" if called else finish_reason(event)))
        return out

    def choice(self, delta: dict, logprobs=None, reason=None) -> dict:
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def logprobs(self, upto: int) -> dict | None:
        if self.job.request.logprobs is None:
            return None
        items, self.scored = self.job.logprobs[self.scored:upto], max(self.scored, upto)
        return chat_logprobs(self.tokenizer, items)


@bp.post("/chat/completions")
def chat_completions():
    body = json_body(request)
    chat, tools = chat_request(body)
    n = choice_count(body)
    streaming = flag(body, "stream", False)
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    include_usage = streaming and flag(options, "include_usage", False)
    jobs = submit_choices(chat, n)
    engine, watch = current_engine(), client_watcher(request.environ)
    tokenizer, prefilled = tokenizer_of(engine), bool(chat.answer_prefix)
    head = {"id": f"chatcmpl-{jobs[0].id}", "created": int(time.time()), "model": model_id()}
    if not streaming:
        finished = wait_all(engine, ROUTE, jobs, watch)
        return jsonify({**head, "object": "chat.completion",
                        "choices": [whole_choice(i, job, f, prefilled, tools, tokenizer)
                                    for i, (job, f) in enumerate(zip(jobs, finished))],
                        "usage": usage(finished, n)})

    streams = [ChoiceStream(i, job, prefilled, tools, tokenizer) for i, job in enumerate(jobs)]

    def chunk(choice: dict) -> bytes:
        usage_field = {"usage": None} if include_usage else {}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **usage_field})

    def events():
        for stream in streams:  # (content null until words come, as OpenAI's tool-call streams start)
            yield chunk(stream.choice({"role": "assistant", "content": None if tools else ""}))
        for i, event in follow_all(engine, jobs, watch, ROUTE):
            if isinstance(event, Finished) and event.finish_reason == "error":
                yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                     "param": None, "code": "generation_failed"}})
                continue
            for choice in streams[i].choices(event):
                yield chunk(choice)
        if include_usage and all(job.result.finish_reason != "error" for job in jobs):
            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                       "usage": usage([job.result for job in jobs], n)})
        yield b"data: [DONE]\n\n"

    return event_stream(events(), *jobs)


def whole_choice(index: int, job: Job, finished: Finished, prefilled: bool, tools: ToolUse | None, tokenizer) -> dict:
    content = clean_continuation(finished.generated, prefilled)
    message, called = reply_message(content, tools.format) if tools else ({"role": "assistant", "content": content},
                                                                          False)
    logprobs = chat_logprobs(tokenizer, job.logprobs) if job.request.logprobs is not None else None
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": "tool_calls" if called else finish_reason(finished)}

"""OpenAI's legacy text completions, `POST /v1/completions`: a raw prompt continued, no chat template.

What the `llm` CLI's completion models and lm-evaluation-harness's `local-completions` use: `prompt` as text
(or token ids, or a list of either), `echo` to get the prompt back, and `logprobs` (int) for each token's
logprob, with `echo` the prompt's too (the loglikelihood an evaluation harness scores). A text prompt is
tokenized as ChatGLM2's tokenizer does it ([gMASK] sop, then the text); token ids are used as they are.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from ..engine import Finished, Job
from ..engine.budget import GenerationRequest
from .app import current_engine
from .openai_fields import (
    IGNORED,
    MAX_TOP_LOGPROBS,
    SAMPLING,
    choice_count,
    finish_reason,
    model_id,
    sampling_request,
    submit_choices,
    text_logprobs,
    usage,
)
from .relay import appended, client_watcher, event_stream, follow_all, sse, tokenizer_of, wait_all
from .structured import checked, needs_local_engine, response_format_grammar
from .validation import ApiError, flag, json_body, number, refuse_unknown, shown

bp = Blueprint("completions", __name__, url_prefix="/v1")

FIELDS = {"model", "prompt", "max_tokens", "stream", "stream_options", "echo", "logprobs", "suffix", "best_of",
          "response_format", *SAMPLING}
DEFAULT_MAX_TOKENS = 16  # OpenAI's
ROUTE = "/v1/completions"


def prompts_of(body: dict, tokenizer) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt: a string, a list of token ids, or a list of either."""
    value = body.get("prompt")
    if value is None:
        raise ApiError(400, "'prompt' is required: a string, a list of token ids, or a list of those",
                       param="prompt")
    many = isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value)
    prompts = []
    for item in value if many else [value]:
        if isinstance(item, str):
            prompts.append((item, tokenizer.prompt_prefix() + tokenizer.sp.encode(item)))
        elif isinstance(item, list) and item and all(type(t) is int for t in item):
            if not all(0 <= t < tokenizer.vocab_size for t in item):
                raise ApiError(400, f"'prompt' holds a token id outside 0 to {tokenizer.vocab_size - 1}",
                               param="prompt")
            prompts.append((tokenizer.decode(item), list(item)))
        else:
            raise ApiError(400, f"'prompt' must be a string, a non-empty list of token ids, or a list of those, "
                                f"not {shown(item, 60)}", param="prompt")
    return prompts


def completion_requests(body: dict, tokenizer) -> tuple[list[GenerationRequest], list[str]]:
    refuse_unknown(body, FIELDS, IGNORED)
    if body.get("suffix"):
        raise ApiError(400, "'suffix' (text after the completion) is not supported: ChatGLM2 has no fill-in-the-"
                            "middle mode; remove it", param="suffix", code="unsupported_field")
    n = number(body, "n", 1, integer=True, low=1)
    if number(body, "best_of", n, integer=True, low=1) != n:
        raise ApiError(400, "'best_of' must equal 'n' (each choice is returned, none is picked)", param="best_of",
                       code="unsupported_field")
    echo = flag(body, "echo", False)
    top = number(body, "logprobs", None, integer=True, low=0, high=MAX_TOP_LOGPROBS)
    if top is not None:
        needs_local_engine(current_engine(), "logprobs")
    max_tokens = number(body, "max_tokens", DEFAULT_MAX_TOKENS, integer=True, low=0 if echo else 1)
    grammar = checked(response_format_grammar(body.get("response_format")), current_engine())
    prompts = prompts_of(body, tokenizer)
    fields = sampling_request(body)
    return [GenerationRequest(query=text, prompt_ids=ids, max_new_tokens=max_tokens, grammar=grammar,
                              logprobs=top, echo_logprobs=echo and top is not None, **fields)
            for text, ids in prompts], [text for text, _ in prompts]


@bp.post("/completions")
def completions():
    body = json_body(request)
    engine = current_engine()
    tokenizer = tokenizer_of(engine)
    requests, texts = completion_requests(body, tokenizer)
    n = choice_count(body, prompts=len(requests))
    echo = flag(body, "echo", False)
    streaming = flag(body, "stream", False)
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    include_usage = streaming and flag(options, "include_usage", False)
    jobs = [job for req in requests for job in submit_choices(req, n)]  # prompt by prompt, n choices each
    head = {"id": f"cmpl-{jobs[0].id}", "created": int(time.time()), "model": model_id()}
    watch = client_watcher(request.environ)
    shown_texts = [texts[i // n] if echo else "" for i in range(len(jobs))]
    if not streaming:
        finished = wait_all(engine, ROUTE, jobs, watch)
        return jsonify({**head, "object": "text_completion", "usage": usage(finished, n), "choices": [
            {"index": i, "text": shown_texts[i] + f.generated, "finish_reason": finish_reason(f),
             "logprobs": logprobs_of(tokenizer, job, shown_texts[i])}
            for i, (job, f) in enumerate(zip(jobs, finished))]})

    def chunk(index: int, text: str, logprobs=None, reason=None) -> bytes:
        usage_field = {"usage": None} if include_usage else {}
        return sse({**head, "object": "text_completion", **usage_field,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]})

    def events():
        sent = ["" for _ in jobs]  # generated text sent per choice
        scored = [0 for _ in jobs]  # completion tokens whose logprobs were sent
        echoed = [not echo for _ in jobs]
        for i, event in follow_all(engine, jobs, watch, ROUTE):
            job = jobs[i]
            if isinstance(event, Finished) and event.finish_reason == "error":
                yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                     "param": None, "code": "generation_failed"}})
                continue
            if not echoed[i]:
                echoed[i] = True
                yield chunk(i, shown_texts[i], prompt_logprobs_of(tokenizer, job))
            new = appended(sent[i], event.generated)
            logprobs = None
            if job.request.logprobs is not None and event.completion_tokens > scored[i]:
                items = job.logprobs[scored[i]:event.completion_tokens]
                logprobs = text_logprobs(tokenizer, [t.id for t in items], items,
                                         len(shown_texts[i]) + len(sent[i]))
                scored[i] = event.completion_tokens
            if new or logprobs:
                yield chunk(i, new, logprobs)
                sent[i] += new
            if isinstance(event, Finished):
                yield chunk(i, "", reason=finish_reason(event))
        if include_usage and all(job.result.finish_reason != "error" for job in jobs):
            yield sse({**head, "object": "text_completion", "choices": [],
                       "usage": usage([job.result for job in jobs], n)})
        yield b"data: [DONE]\n\n"

    return event_stream(events(), *jobs)


def prompt_logprobs_of(tokenizer, job: Job) -> dict | None:
    """The echoed prompt's tokens and logprobs (the first token has none), or None when not asked for."""
    if not job.request.echo_logprobs or job.prompt_logprobs is None:
        return None
    return text_logprobs(tokenizer, job.prompt.ids, job.prompt_logprobs, 0, continuation=False)


def logprobs_of(tokenizer, job: Job, echoed: str) -> dict | None:
    """A whole choice's logprobs: the echoed prompt's (with echo), then the completion's."""
    if job.request.logprobs is None:
        return None
    items = job.logprobs
    completion = text_logprobs(tokenizer, [t.id for t in items], items, len(echoed))
    prompt = prompt_logprobs_of(tokenizer, job)
    if prompt is None:
        return completion
    return {key: prompt[key] + completion[key] for key in completion}


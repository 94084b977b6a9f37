"""What OpenAI's chat and text completions share: the sampling fields, n choices, usage, finish reasons and
logprobs in both of OpenAI's shapes. Defined once here, so the two routes cannot drift apart."""

from __future__ import annotations

import dataclasses

from ..engine import Finished, Job
from ..engine.budget import GenerationRequest
from .app import current_engine, current_settings, model_name
from .relay import submit_all, tokenizer_of
from .validation import ApiError, logit_bias, number, penalty_fields, sampling_fields

TOP_P, TEMPERATURE = 0.7, 1.0  # the seed's defaults, which suit ChatGLM2 better than OpenAI's top_p=1
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
SAMPLING = {"temperature", "top_p", "seed", "stop", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias", "n"}
# Accepted without effect: they describe the caller or OpenAI's own storage and billing, not the reply.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
LOWEST_LOGPROB = -9999.0  # JSON has no -inf: a token the model rules out is reported as this


def model_id() -> str:
    """The model's name (app.model_name). A request may name any model: there is one, and clients configured for
    another name (an alias) reach it too."""
    return model_name(current_settings())


def sampling_request(body: dict) -> dict:
    """GenerationRequest fields from the sampling knobs both routes take."""
    bias = {}
    if body.get("logit_bias") is not None:
        bias = {"logit_bias": logit_bias(body, tokenizer_of(current_engine()).first_special_id)}
    return {"seed": number(body, "seed", None, integer=True, low=-2**63, high=2**64 - 1),  # torch's range
            "stop": stop_strings(body), **sampling_fields(body, TOP_P, TEMPERATURE), **penalty_fields(body), **bias}


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return [s for s in stops if s]


def choice_count(body: dict, prompts: int = 1) -> int:
    """`n`, bounded by how many rows the engine decodes together (n choices of p prompts take n * p rows)."""
    n = number(body, "n", 1, integer=True, low=1)
    rows = current_engine().max_batch or 1
    if n * prompts > rows:
        raise ApiError(400, f"'n' × prompts must be at most {rows} (the requests this server decodes together), "
                            f"not {n * prompts}", param="n")
    return n


def submit_choices(request: GenerationRequest, n: int) -> list[Job]:
    """n jobs for one request, each with its own random stream (seed, seed + 1, …), queued together so that the
    engine runs their prompt once."""
    requests = [request if i == 0 or request.seed is None else
                dataclasses.replace(request, seed=(request.seed + i) % 2**64) for i in range(n)]
    try:
        return submit_all(current_engine(), requests)
    except ApiError as error:
        if error.code == "context_length_exceeded":  # OpenAI answers an overlong prompt with 400
            error.status = 400
        raise


def finish_reason(finished: Finished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


def usage(finished: list[Finished], n: int = 1) -> dict:
    """Each prompt counted once (its n choices share it), every choice's reply counted; `finished` holds each
    prompt's n choices in turn."""
    firsts = finished[::n]
    prompt, cached = sum(f.prompt_tokens for f in firsts), sum(f.cached_tokens for f in firsts)
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def logprob_value(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def chat_logprobs(tokenizer, items: list) -> dict:
    """Chat completions' shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": tokenizer.token_name(token), "logprob": logprob_value(logprob),
                "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**entry(item.id, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}
                        for item in items], "refusal": None}


def text_logprobs(tokenizer, ids: list[int], items: list, start_offset: int, continuation: bool = True) -> dict:
    """Text completions' shape: parallel lists of tokens, their logprobs, {token: logprob} alternatives and each
    token's character offset in the returned text. items[i] scores ids[i]; it is None for a prompt's first.
    A completion's tokens continue a text (a leading space counts); a prompt's begin one."""
    tokens, values, tops, offsets = [], [], [], []
    decoder, offset = tokenizer.stream_decoder(continuation), start_offset
    for token, item in zip(ids, items):
        offsets.append(offset)
        tokens.append(tokenizer.token_name(token))
        values.append(None if item is None else logprob_value(item.logprob))
        tops.append({tokenizer.token_name(t): logprob_value(lp) for t, lp in item.top} if item and item.top
                    else None)
        offset += len(decoder.add(token))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

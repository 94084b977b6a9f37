"""Request validation: turn untrusted JSON into a GenerationRequest, or an ApiError a person can act on.

Field rules live here once and every endpoint family reuses them. Numbers may arrive as numeric strings (the
seed documented `max_length` as a string), booleans as "false"/"0"/"no".
"""

from __future__ import annotations

import json
import math

from flask import Request

from ..errors import ApiError  # noqa: F401 (defined in errors.py, importable here too)

MAX_TEMPERATURE = 2.0


def json_body(request: Request) -> dict:
    """The request's JSON object. JSON sent as text/plain (what a browser's simple fetch sends) is accepted."""
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json") and mimetype != "text/plain":
        raise ApiError(415, f"the body must be JSON sent with Content-Type: application/json, not {mimetype}")
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object such as {\"query\": \"你好\"}")
    body = parse_json(raw, "the body")
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


def parse_json(raw: str | bytes, what: str, param: str | None = None, expected: str = ""):
    """JSON that is valid Unicode text and not absurdly nested, or a 400 that says which."""
    expected = expected or f"{what} is not valid JSON; send a JSON object such as {{\"query\": \"你好\"}}"
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"{what} is nested too deeply; send plain objects and lists", param=param) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"{expected} ({str(exc)[:80]})", param=param) from None
    if not valid_text(value):
        raise ApiError(400, f"{what} holds a string that is not valid Unicode text (a lone surrogate such as "
                            "\\ud800); send UTF-8 text", param=param)
    return value


def valid_text(value) -> bool:
    """Whether every string in a parsed JSON value encodes to UTF-8 (JSON escapes can smuggle lone surrogates)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            todo.extend(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return True


def shown(value, limit: int = 40) -> str:
    """A bad value as an error message quotes it: short, whatever its size."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def text(body: dict, name: str, default: str | None = None, required: bool = False, allow_empty=True) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required: a non-empty string", param=name)
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, not {type(value).__name__}", param=name)
    if not allow_empty and not value.strip():
        raise ApiError(400, f"'{name}' must not be empty", param=name)
    return value


def number(body: dict, name: str, default, *, integer=False, low=None, high=None, low_open=False):
    """A number (or numeric string) within [low, high] ((low, high] when low_open)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ApiError(400, f"'{name}' must be a number, not {shown(value)}", param=name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be a number, not {shown(value)}", param=name)
    if integer:
        if value != int(value):
            raise ApiError(400, f"'{name}' must be a whole number, not {shown(value)}", param=name)
        value = int(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ApiError(400, f"'{name}' must be {' and '.join(p for p in (lo, hi) if p)}, not {shown(value)}",
                       param=name)
    return value


def flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ApiError(400, f"'{name}' must be true or false, not {shown(value)}", param=name)


def history_pairs(body: dict, name: str = "history") -> list[tuple[str, str]]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):  # GET /generate passes history as a JSON string
        value = parse_json(value, f"'{name}'", param=name,
                           expected=f"'{name}' must be a JSON list of [question, answer] pairs") if value.strip() else []
    if not isinstance(value, list):
        raise ApiError(400, f"'{name}' must be a list of [question, answer] pairs", param=name)
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ApiError(400, f"'{name}[{i}]' must be a pair of two strings [question, answer], "
                                f"not {shown(pair, 60)}", param=name)
    return [(q, a) for q, a in value]


def sampling_fields(body: dict, top_p_default: float, temperature_default: float) -> dict:
    return {
        "top_p": number(body, "top_p", top_p_default, low=0, high=1, low_open=True),
        # below MIN_TEMPERATURE sampling is greedy (generate.sample): logits / 1e-40 overflow to inf
        "temperature": number(body, "temperature", temperature_default, low=0, high=MAX_TEMPERATURE),
    }


def penalty_fields(body: dict) -> dict:
    """Sampling knobs beyond temperature/top_p that every route takes under OpenAI's and vLLM's names."""
    top_k = number(body, "top_k", 0, integer=True, low=-1)
    return {
        "top_k": max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean no limit
        "min_p": number(body, "min_p", 0.0, low=0, high=1),
        "presence_penalty": number(body, "presence_penalty", 0.0, low=-2, high=2),
        "frequency_penalty": number(body, "frequency_penalty", 0.0, low=-2, high=2),
        "repetition_penalty": number(body, "repetition_penalty", 1.0, low=0, high=2, low_open=True),
    }


def logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, at most 300 entries."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 300:
        raise ApiError(400, "'logit_bias' must be an object of at most 300 {\"token id\": bias} entries",
                       param="logit_bias")
    bias = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"'logit_bias' keys must be token ids, not {shown(key)}", param="logit_bias") from None
        if not 0 <= token < vocab:
            raise ApiError(400, f"'logit_bias' token {token} is not in the vocabulary (0 to {vocab - 1})",
                           param="logit_bias")
        bias[token] = number({"logit_bias": amount}, "logit_bias", None, low=-100, high=100)
    return bias


def refuse_unknown(body: dict, known: set[str], ignored: frozenset[str] = frozenset()) -> None:
    """A field this route does not implement is refused by name: a client must not believe it took effect.
    `ignored` fields are accepted and have no effect on a local model by their nature (`user`, `store`, …)."""
    unknown = sorted(set(body) - known - ignored)
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise ApiError(400, f"{names} {'is' if len(unknown) == 1 else 'are'} not supported by this server; remove "
                            f"{'it' if len(unknown) == 1 else 'them'} (see docs/api.md for the fields it takes)",
                       param=unknown[0], code="unsupported_field")

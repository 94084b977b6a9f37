"""Ollama's native API on the same engine: `/api/tags`, `/api/ps`, `/api/show`, `/api/version`, `/api/chat` and
`/api/generate`, for clients that speak only Ollama (the `ollama` libraries, Open WebUI's Ollama connection,
Enchanted, Page Assist, VS Code's Ollama provider).

Streams are NDJSON, one object a line, the last with `done: true`, counts and durations in nanoseconds as Ollama
reports them. Errors are Ollama's `{"error": "…"}` (app.error_response). The one model answers to any name.
"""

from __future__ import annotations

import datetime
import json

from flask import Blueprint, Response, jsonify, request

from .. import __version__
from ..engine import Finished, Job, Update
from ..engine.budget import GenerationRequest
from ..engine.grammar import json_schema_grammar
from ..model.tokenizer import clean_reply
from .app import current_engine, current_settings, prompt_family
from .openai_fields import TEMPERATURE, TOP_P, model_id
from .relay import appended, client_watcher, event_stream, follow, submit, tokenizer_of, wait_for
from .structured import checked, schema_grammar
from .tool_calls import StreamedCalls, ToolUse, chat_with_tools
from .validation import ApiError, flag, json_body, number, penalty_fields, refuse_unknown, sampling_fields, shown, text

bp = Blueprint("ollama", __name__, url_prefix="/api")

OLLAMA_API_VERSION = "0.12.0"  # the Ollama release whose API shapes this follows (clients compare versions)
COMMON = {"model", "format", "options", "stream", "keep_alive", "think"}
CHAT_FIELDS = {"messages", "tools", *COMMON}
GENERATE_FIELDS = {"prompt", "suffix", "system", "raw", "images", "template", "context", *COMMON}
# options that set up the model or the machine: the server chose those at start, so they change no reply
SETUP_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "vocab_only", "use_mmap",
                 "use_mlock", "numa", "num_thread", "num_keep", "embedding_only", "logits_all"}
SAMPLING_OPTIONS = {"num_predict", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty",
                    "presence_penalty", "frequency_penalty"}
STARTED = datetime.datetime.now(datetime.timezone.utc)


def tagged_name() -> str:
    return f"{model_id()}:latest"


def model_details() -> dict:
    loaded = current_engine().loaded
    plan = getattr(loaded, "plan", None)
    level = "unknown" if plan is None else {4: "Q4", 8: "Q8"}.get(plan.bits, plan.dtype.upper().replace("FLOAT", "F"))
    return {"parent_model": "", "format": "safetensors", "family": "chatglm", "families": ["chatglm"],
            "parameter_size": "6.2B", "quantization_level": level}


def model_entry() -> dict:
    folder = current_settings().model_dir
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    return {"name": tagged_name(), "model": tagged_name(), "modified_at": STARTED.isoformat(), "size": size,
            "digest": "", "details": model_details()}


@bp.get("/version")
def version():
    return jsonify({"version": OLLAMA_API_VERSION, "server": f"my-chatglm2 {__version__}"})


@bp.get("/tags")
def tags():
    return jsonify({"models": [model_entry()] if current_engine().state == "ready" else []})


@bp.get("/ps")
def running():
    engine = current_engine()
    if engine.state != "ready":
        return jsonify({"models": []})
    plan = getattr(engine.loaded, "plan", None)
    vram = model_entry()["size"] if plan is not None and plan.device == "cuda" else 0
    forever = datetime.datetime(2999, 1, 1, tzinfo=datetime.timezone.utc).isoformat()
    return jsonify({"models": [{**model_entry(), "expires_at": forever, "size_vram": vram,
                                "context_length": engine.max_context}]})


@bp.post("/show")
def show():
    body = json_body(request)
    if not isinstance(body.get("model") or body.get("name"), str):  # (older clients send "name")
        raise ApiError(400, "'model' is required: the model's name, e.g. \"chatglm2-6b\"", param="model")
    engine = current_engine()
    return jsonify({"modelfile": "", "parameters": f"temperature {TEMPERATURE}\ntop_p {TOP_P}",
                    "template": "[Round N]\n\n问：{{ .Prompt }}\n\n答：{{ .Response }}",
                    "license": "ChatGLM2-6B model license (see the model folder's MODEL_LICENSE)",
                    "details": model_details(), "modified_at": STARTED.isoformat(),
                    "model_info": {"general.architecture": "chatglm", "general.parameter_count": 6_243_584_000,
                                   "chatglm.context_length": engine.max_context},
                    "capabilities": ["completion", "tools"]})


def options_of(body: dict) -> dict:
    """Ollama's `options` -> GenerationRequest fields; setup options are accepted without effect, any other
    option this server does not implement is refused by name."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object such as {\"temperature\": 0.7}", param="options")
    unknown = sorted(set(options) - SETUP_OPTIONS - SAMPLING_OPTIONS)
    if unknown:
        raise ApiError(400, f"option {shown(unknown[0])} is not supported by this server; remove it (see "
                            "docs/api.md for the options it takes)", param="options", code="unsupported_field")
    renamed = {**options, "repetition_penalty": options.get("repeat_penalty")}
    predict = number(options, "num_predict", None, integer=True, low=-2)
    stop = options.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'options.stop' must be a list of strings", param="options")
    return {"max_new_tokens": predict if predict and predict > 0 else None, "stop": [s for s in stop or [] if s],
            "seed": number(options, "seed", None, integer=True, low=-2**63, high=2**64 - 1),
            **sampling_fields(renamed, TOP_P, TEMPERATURE), **penalty_fields(renamed)}


def format_grammar(body: dict, prefix: str = "") -> str | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON Schema."""
    value = body.get("format")
    if value in (None, ""):
        return None
    if value == "json":
        grammar = json_schema_grammar(None)
    elif isinstance(value, dict):
        grammar = schema_grammar(value, "format")
    else:
        raise ApiError(400, f"'format' must be \"json\" or a JSON Schema object, not {shown(value)}", param="format")
    return checked(grammar, current_engine(), prefix, param="format")


def refuse_unsupported(body: dict, messages: list | None = None) -> None:
    if body.get("think"):
        raise ApiError(400, "'think' is not supported: ChatGLM2 does not think before answering; remove it",
                       param="think", code="unsupported_field")
    with_images = body.get("images") or any(isinstance(m, dict) and m.get("images") for m in messages or [])
    if with_images:
        raise ApiError(400, "images are not supported: ChatGLM2 reads text only", param="images",
                       code="unsupported_field")


@bp.post("/chat")
def chat():
    body = json_body(request)
    refuse_unknown(body, CHAT_FIELDS)
    messages = body.get("messages")
    refuse_unsupported(body, messages if isinstance(messages, list) else None)
    tool_fields = {"tools": body["tools"]} if body.get("tools") else {}  # (Ollama has no tool_choice)
    tools, (system, query, history, prefix) = chat_with_tools(messages, tool_fields, prompt_family())
    grammar = format_grammar(body, prefix)
    if tools is not None:
        if grammar is not None:
            raise ApiError(400, "'format' and 'tools' cannot be combined: a reply is either a call or the "
                                "formatted answer", param="format")
        grammar = checked(tools.grammar, current_engine(), prefix, param="tools")
    job = submit(current_engine(), GenerationRequest(query=query, history=history, answer_prefix=prefix, system=system,
                                                     grammar=grammar, **options_of(body)))
    return respond(body, job, "/api/chat", ChatShape(tools))


@bp.post("/generate")
def generate():
    body = json_body(request)
    refuse_unknown(body, GENERATE_FIELDS)
    refuse_unsupported(body)
    for name, why in (("suffix", "ChatGLM2 has no fill-in-the-middle mode"),
                      ("template", "the server uses ChatGLM2's own prompt format"),
                      ("context", "send the conversation as messages to /api/chat")):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported: {why}; remove it", param=name, code="unsupported_field")
    prompt = text(body, "prompt", default="")
    if not prompt.strip():  # Ollama's way to load a model: nothing to generate
        return jsonify({"model": tagged_name(), "created_at": now(), "response": "", "done": True,
                        "done_reason": "load"})
    system = text(body, "system", default="")
    raw = flag(body, "raw", False)
    request_fields = options_of(body)
    if raw:
        tokenizer = tokenizer_of(current_engine())
        generation = GenerationRequest(query=prompt, prompt_ids=tokenizer.prompt_prefix() + tokenizer.sp.encode(
            prompt), grammar=format_grammar(body), **request_fields)
    else:
        generation = GenerationRequest(query=prompt, system=system, grammar=format_grammar(body), **request_fields)
    return respond(body, submit(current_engine(), generation), "/api/generate", GenerateShape(raw))


class ChatShape:
    """/api/chat's objects: message deltas (words as content, finished tool calls as tool_calls)."""

    def __init__(self, tools: ToolUse | None):
        self.calls = StreamedCalls(tools.format) if tools else None
        self.sent = ""

    def deltas(self, event: Update | Finished) -> list[dict]:
        reply = clean_reply(event.generated)
        out = []
        for delta in self.calls.deltas(reply) if self.calls else [{"content_upto": reply}]:
            if "tool_calls" in delta:
                continue  # (sent whole below, as Ollama sends a call)
            new = appended(self.sent, delta["content_upto"])
            if new:
                out.append({"message": {"role": "assistant", "content": new}})
                self.sent += new
        if isinstance(event, Finished) and self.calls and self.calls.called:
            calls = [{"function": call} for call in self.calls.fmt.read_calls(reply)]
            out.append({"message": {"role": "assistant", "content": "", "tool_calls": calls}})
        return out

    def whole(self, finished: Finished) -> dict:
        reply = clean_reply(finished.generated)
        calls = self.calls.fmt.read_calls(reply) if self.calls else []
        if calls:
            return {"message": {"role": "assistant", "content": "",
                                "tool_calls": [{"function": call} for call in calls]}}
        return {"message": {"role": "assistant", "content": reply}}

    @staticmethod
    def closing() -> dict:
        return {"message": {"role": "assistant", "content": ""}}


class GenerateShape:
    """/api/generate's objects: `response` deltas (a raw prompt's continuation keeps its leading space)."""

    def __init__(self, raw: bool):
        self.raw, self.sent = raw, ""

    def reply(self, generated: str) -> str:
        return generated if self.raw else clean_reply(generated)

    def deltas(self, event: Update | Finished) -> list[dict]:
        new = appended(self.sent, self.reply(event.generated))
        self.sent += new
        return [{"response": new}] if new else []

    def whole(self, finished: Finished) -> dict:
        return {"response": self.reply(finished.generated)}

    @staticmethod
    def closing() -> dict:
        return {"response": ""}


def respond(body: dict, job: Job, route: str, shape) -> Response:
    engine, watch, name = current_engine(), client_watcher(request.environ), tagged_name()
    if not flag(body, "stream", True):
        finished = wait_for(engine, route, job, watch)
        return jsonify({"model": name, "created_at": now(), **shape.whole(finished), **final(finished)})

    def lines():  # (runs after the request's context is gone: everything it needs is bound above)
        for event in follow(engine, job, watch, route):
            if isinstance(event, Finished) and event.finish_reason == "error":
                yield ndjson({"error": f"generation failed: {event.error}"})
                return
            for delta in shape.deltas(event):
                yield ndjson({"model": name, "created_at": now(), **delta, "done": False})
            if isinstance(event, Finished):
                yield ndjson({"model": name, "created_at": now(), **shape.closing(), **final(event)})

    return event_stream(lines(), job, content_type="application/x-ndjson")


def final(finished: Finished) -> dict:
    """The last object's fields: why it ended, token counts and durations in nanoseconds."""
    prompt_seconds = finished.first_token_seconds or 0.0
    return {"done": True, "done_reason": "length" if finished.finish_reason == "length" else "stop",
            "total_duration": int(finished.seconds * 1e9), "load_duration": 0,
            "prompt_eval_count": finished.prompt_tokens,
            "prompt_eval_duration": int(prompt_seconds * 1e9), "eval_count": finished.completion_tokens,
            "eval_duration": int(max(finished.seconds - prompt_seconds, 0.0) * 1e9)}


def ndjson(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


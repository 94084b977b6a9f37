"""The Flask application: `create_app(settings, engine)` wires blueprints, errors, CORS, the API key and /health.

Nothing heavy happens here: the engine (loading in the background, or ready) is passed in, never imported.
"""

from __future__ import annotations

import hmac
import logging
import sys

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..config import Settings
from ..engine.contract import GenerationEngine
from ..model.checkpoint import read_config
from ..model.family import family_of
from . import origin
from .validation import ApiError, shown

log = logging.getLogger(__name__)

ENGINE_KEY, SETTINGS_KEY = "chatglm2.engine", "chatglm2.settings"  # where create_app keeps them (see below)
OPEN_ROUTES = ("/", "/health")  # answered without the API key: a liveness check reveals nothing
OPEN_PREFIX = "/ui"  # the page itself; the API calls it makes carry the key
KEYED_UI = ("/ui/render",)  # costs CPU: only for callers with the key


def create_app(settings: Settings, engine: GenerationEngine) -> Flask:
    from .completions_api import bp as completions_bp
    from .ollama_api import bp as ollama_bp
    from .openai_api import bp as openai_bp
    from .original_api import bp as seed_bp
    from .page import bp as web_bp

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    app.extensions[ENGINE_KEY] = engine
    app.extensions[SETTINGS_KEY] = settings
    app.register_blueprint(seed_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(completions_bp)
    app.register_blueprint(ollama_bp)
    app.register_blueprint(web_bp)

    @app.get("/health")
    def health():
        status = 200 if engine.state == "ready" else 503
        if settings.api_key and not has_key(settings.api_key):  # anonymous: the state, nothing about the machine
            return jsonify({"status": engine.state, "progress": engine.detail.get("progress")}), status
        loaded = engine.loaded
        body = {
            "status": engine.state,
            "model": str(settings.model_dir),
            "device": loaded.plan.device if loaded else None,
            "precision": loaded.plan.precision if loaded else None,
            "name": model_name(settings),  # as /v1/models and /api/tags name it
            "prompt_format": loaded.tokenizer.family if loaded else None,  # chatglm2 or chatglm3 (model/family.py)
            "profile": loaded.plan.profile if loaded else settings.profile,
            "max_context": engine.max_context or settings.max_context,
            "queue": engine.queue_length,
            "running": engine.running_id,
            "running_jobs": engine.running_ids,
            "queued_jobs": engine.queued_ids,
            "max_batch": engine.max_batch if loaded else None,
            "cpu_kernels": getattr(loaded, "cpu_kernels", None),  # which CPU kernels run, and their measured speeds
            "cpu_threads": getattr(loaded, "cpu_threads", None),  # how many threads compute on the CPU, and why
            "layered_prefill": layered_prefill(engine) if loaded else None,
            "prompt_cache": engine.prefix_cache.usage() if engine.prefix_cache is not None else None,
            "version": __version__,
            "notices": engine.notices,
            **engine.detail,
        }
        return jsonify(body), status

    app.before_request(lambda: origin.check(request, settings.host, settings.allow_origin))
    app.before_request(lambda: check_api_key(settings.api_key))
    app.after_request(lambda response: allow_cross_origin(response, settings.allow_origin))
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    return app


def layered_prefill(engine: GenerationEngine) -> dict | None:
    """From how many prompt tokens, in pieces of at most how many, a long prompt runs one decoder layer per decode
    step of the other replies (engine/layered_prefill.py, chosen at start from the kernels' timings); None where
    prompts always run in token chunks (or the engine is a front end)."""
    start = getattr(engine, "layered_from", None)
    if not start or start == sys.maxsize:
        return None
    return {"from_tokens": start, "piece_tokens": engine.layered_piece}


def model_name(settings: Settings) -> str:
    """The model's name (`chatglm2-6b`): the last part of the repository its folder's config.json names (the
    published configs do: `THUDM/chatglm3-6b`), else of --repo (a front end's folder has no config)."""
    named = read_config(settings.model_dir).get("_name_or_path")
    repo = named if isinstance(named, str) and named.strip("/") else settings.repo
    return repo.rstrip("/").rsplit("/", 1)[-1] or "chatglm2-6b"


def prompt_family() -> str:
    """The prompt format of the model this request goes to: the loaded tokenizer's, or before it has loaded,
    the chosen --model's (model/family.py)."""
    loaded = current_engine().loaded
    return loaded.tokenizer.family if loaded else family_of(current_settings().model)


def current_engine() -> GenerationEngine:
    """The engine of the app handling this request (a local Engine or an UpstreamEngine: the same surface)."""
    return current_app.extensions[ENGINE_KEY]


def current_settings() -> Settings:
    return current_app.extensions[SETTINGS_KEY]


def has_key(api_key: str) -> bool:
    """`Authorization: Bearer <key>`, the scheme in any case (RFC 7235); compared in constant time."""
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    matches = hmac.compare_digest(sent.strip().encode("latin-1", "replace"), api_key.encode("latin-1", "replace"))
    return scheme.lower() == "bearer" and matches


def check_api_key(api_key: str | None):
    open_route = request.path in OPEN_ROUTES or (request.path.startswith(OPEN_PREFIX) and request.path not in KEYED_UI)
    if not api_key or request.method == "OPTIONS" or open_route:
        return None
    if not has_key(api_key):
        raise ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    return None


def allow_cross_origin(response, allow_origin: str | None):
    origin.add_cors_headers(response, request, allow_origin)
    return response


def error_response(error: ApiError):
    """One error shape per API family: OpenAI's under /v1/, Ollama's under /api/, the seed's everywhere else."""
    if request.path.startswith("/api/"):
        body = {"error": error.message}
    elif request.path.startswith("/v1/"):
        kind = "invalid_request_error" if error.status < 500 and error.status != 429 else "server_error"
        body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
    else:
        body = {"success": False, "message": error.message, **error.extra}
    return jsonify(body), error.status, error.headers


def api_error(error: ApiError):
    return error_response(error)


def http_error(error: HTTPException):
    allowed = getattr(error, "valid_methods", None) or []
    message = {
        404: f"there is no {shown(request.path)} here; see docs/api.md for the endpoints",
        405: f"{request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}",
        413: "the request body is too large; send less history or raise --max-body-bytes",
    }.get(error.code, error.description)
    headers = {"Allow": ", ".join(allowed)} if allowed else {}
    return error_response(ApiError(error.code or 500, message, headers=headers))


def unexpected_error(error: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(ApiError(500, "internal server error; the server log has the details"))

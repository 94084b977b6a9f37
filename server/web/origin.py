"""Who may call the server from a browser: safe defaults for a server on the user's own machine.

Any web page the user visits can send a simple cross-origin POST to http://127.0.0.1:5178 and, were every
origin allowed, read the reply and interrupt the user's jobs; a DNS-rebinding page can even make its requests
same-origin. So, as Ollama does:
- Origin: browsers send it on cross-origin requests. Allowed are loopback origins (http://127.0.0.1:*,
  http://localhost:*, http://[::1]:*), the server's own origin, and those given with --allow-origin (`*` for
  any). Requests without an Origin header (curl, scripts, the openai client) are not browsers and pass.
- Host: on a loopback bind, a request must be addressed to a loopback name or address; a rebinding page's
  requests carry its own host name and are refused.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from flask import Request

from .validation import ApiError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    name = hostname.strip("[]").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_origins(setting: str | None) -> set[str]:
    return {o.strip().rstrip("/") for o in (setting or "").split(",") if o.strip()}


def origin_allowed(origin: str, request: Request, extra: set[str]) -> bool:
    if "*" in extra or origin.rstrip("/") in extra:
        return True
    parts = urlsplit(origin)
    if parts.scheme in ("http", "https") and is_loopback(parts.hostname):
        return True
    return origin == f"{request.scheme}://{request.host}"  # the page's own origin


def check(request: Request, bind_host: str, allow_origin: str | None) -> None:
    """Refuse (403) a request addressed to another host on a loopback bind, or from a foreign browser origin."""
    # HTTP/1.0 needs no Host header: such a request is addressed to whatever this server is bound to
    addressed = request.host if "HTTP_HOST" in request.environ else bind_host
    if is_loopback(bind_host) and not is_loopback(urlsplit(f"//{addressed}").hostname):
        raise ApiError(403, f"this server answers only requests addressed to 127.0.0.1 or localhost, not "
                            f"{request.host[:80]} (a guard against DNS rebinding); to serve other machines, start "
                            "it with --host 0.0.0.0 and an --api-key", code="forbidden_host")
    origin = request.headers.get("Origin")
    if origin and not origin_allowed(origin, request, allowed_origins(allow_origin)):
        raise ApiError(403, f"requests from the web page {origin[:80]} are not allowed; to allow that origin, "
                            f"start the server with --allow-origin {origin[:80]} (or set allow_origin in "
                            "settings.ini)", code="forbidden_origin")


def add_cors_headers(response, request: Request, allow_origin: str | None) -> None:
    """For an allowed browser origin: let it read the response (a refused one gets no CORS headers)."""
    origin = request.headers.get("Origin")
    if not origin or not origin_allowed(origin, request, allowed_origins(allow_origin)):
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    response.headers["Access-Control-Expose-Headers"] = "X-Job-Id, Retry-After"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Content-Type, Authorization")
        response.headers["Access-Control-Max-Age"] = "600"

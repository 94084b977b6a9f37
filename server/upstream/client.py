"""The wire to an OpenAI-compatible engine (vLLM, SGLang, llama.cpp's server, `transformers serve`).

Two calls: `GET {base}/models` (which model it serves, and its context length where it says) and a streamed
`POST {base}/completions`, read as server-sent events. Only the standard library: a front end needs no HTTP
client package, and a stream must be closable from another thread (an interrupt shuts its socket down, which
ends a read that waits for the next token at once).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

from ..errors import UpstreamError  # noqa: F401 (defined in errors.py, importable here too)

CONNECT_SECONDS = 5.0  # an engine that does not accept a connection by then counts as down
READ_SECONDS = 600.0  # between two events: a long prompt on a slow (CPU) engine can take minutes


def normalize_base(url: str) -> str:
    """'http://host:8000/v1' as given, with a default '/v1' path and no trailing slash."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{url}' is not an http(s) URL such as http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


class Stream:
    """One streamed completion: `events()` yields each event's JSON; `close()` works from any thread."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self._connection = connection
        self._response = response

    def events(self) -> Iterator[dict]:
        data: list[str] = []
        while True:
            line = self._response.readline()
            if not line:  # the upstream (or close()) ended the connection
                return
            line = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and data:  # an event ends with a blank line
                payload = "\n".join(data)
                data = []
                if payload == "[DONE]":
                    return
                try:
                    yield json.loads(payload)
                except ValueError:
                    raise UpstreamError(f"the upstream sent an event that is not JSON: {payload[:80]!r}") from None

    def close(self) -> None:
        sock = self._connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in readline()
            except OSError:
                pass
        self._connection.close()


def connect(base: str) -> http.client.HTTPConnection:
    parts = urlsplit(base)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=CONNECT_SECONDS,
                                           context=ssl.create_default_context())
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=CONNECT_SECONDS)


def request(base: str, method: str, path: str, body: dict | None = None, api_key: str | None = None):
    """Send one request; return (connection, response) once the upstream has answered with a 2xx status."""
    connection = connect(base)
    headers = {"Accept": "application/json, text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = None
    if body is not None:
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
    try:
        connection.connect()
        connection.sock.settimeout(READ_SECONDS)
        connection.request(method, urlsplit(base).path + path, body=payload, headers=headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise UpstreamError(f"{base} does not answer ({describe(exc)})") from None
    if not 200 <= response.status < 300:
        message = error_message(response.read(65536))
        connection.close()
        raise UpstreamError(f"{base} answered {response.status}: {message}", status=response.status)
    return connection, response


def get_json(base: str, path: str, api_key: str | None = None) -> dict:
    connection, response = request(base, "GET", path, api_key=api_key)
    try:
        value = json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise UpstreamError(f"{base}{path} did not answer with JSON ({describe(exc)})") from None
    finally:
        connection.close()
    if not isinstance(value, dict):
        raise UpstreamError(f"{base}{path} did not answer with a JSON object")
    return value


def open_stream(base: str, path: str, body: dict, api_key: str | None = None) -> Stream:
    return Stream(*request(base, "POST", path, body, api_key=api_key))


def error_message(raw: bytes) -> str:
    """The message of an error body, in any of the engines' shapes: OpenAI's {"error": {"message"}}, vLLM's
    older {"object": "error", "message"}, llama.cpp's {"error": {"message"}}, or plain text."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace").strip()[:300] or "no message"
    return event_error(value) or json.dumps(value, ensure_ascii=False)[:300]


def event_error(event) -> str | None:
    """The error an event (or an error body) carries, or None."""
    if not isinstance(event, dict):
        return None
    error = event.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    if isinstance(error, str):
        return error[:300]
    if event.get("object") == "error":
        return str(event.get("message") or event)[:300]
    return None


def describe(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__

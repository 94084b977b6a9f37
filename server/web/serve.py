"""`python -m server`: listen at once, load the model in the background, serve the API with waitress."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import webbrowser
from logging.handlers import RotatingFileHandler

import waitress

from .app import create_app
from ..config import PROJECT_ROOT, Settings, UserError
from ..startup import make_engine
from .relay import chatlog

log = logging.getLogger(__name__)

CHATLOG_PATH = PROJECT_ROOT / "chatlog.log"


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that no other program can share.

    waitress sets SO_REUSEADDR, which on Windows lets a second server bind a port another one already holds (two
    launchers would both "start" and load the model twice). SO_EXCLUSIVEADDRUSE makes the second bind fail there;
    elsewhere SO_REUSEADDR only allows rebinding a port in TIME_WAIT, as usual for servers.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(app, settings: Settings):
    """A waitress server that streams each event as it is written and notices clients that go away."""
    try:
        return waitress.create_server(
            app, sockets=[listening_socket(settings.host, settings.port)],
            # every waiting or decoding stream holds a thread; leave some for quick calls
            threads=settings.max_queue + (getattr(app.extensions.get("chatglm2.engine"), "max_batch", 0) or 8) + 4,
            channel_request_lookahead=1,  # lets waitress report a disconnected client to the app
            # Flask enforces max_body_bytes with a JSON 413; waitress's own (plain-text) limit stays a backstop
            max_request_body_size=4 * settings.max_body_bytes + 65536,
            ident="my-chatglm2",
        )
    except (OSError, UnicodeError) as exc:  # in use, no such address, or a host name that cannot be resolved
        raise UserError(f"无法监听 / Cannot listen on {settings.host}:{settings.port}: {getattr(exc, 'strerror', None) or exc}. "
                        "端口可能已被占用（是否已经开着一个？），可在 settings.ini 里改 port，或用 --port 换一个 / "
                        "The port may be in use (is the server already running?): choose another port in "
                        "settings.ini or with --port.") \
            from exc


def run_server(settings: Settings) -> int:
    warn_if_exposed(settings)
    if settings.chatlog:
        handler = RotatingFileHandler(CHATLOG_PATH, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        chatlog.addHandler(handler)
        chatlog.setLevel(logging.INFO)
    engine, loader = make_engine(settings)
    server = make_server(create_app(settings, engine), settings)
    url = f"http://{browser_host(settings.host)}:{server.effective_port}"

    def ready(loaded) -> None:
        plan = loaded.plan
        log.info("模型已就绪 / The model is ready: chat at %s/ui/ (%s, %s, context %d tokens)", url, plan.device,
                 plan.precision, plan.max_context)

    engine.load_in_background(loader, on_ready=ready)
    log.info("listening on %s; chat page %s/ui/ (the model loads in the background; see /health)", url, url)
    if settings.open_browser:
        # the page shows download and loading progress itself; on a thread, since a console browser (lynx, w3m)
        # would otherwise hold the server until it exits
        threading.Thread(target=webbrowser.open, args=(url + "/ui/",), daemon=True).start()
    try:
        server.run()
    finally:
        engine.close()
    return 0


def browser_host(host: str) -> str:
    """An address a browser on this machine can open for a listening host."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def warn_if_exposed(settings: Settings) -> None:
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if loopback:
        return
    log.warning("listening on %s: other machines on the network can reach this server%s", settings.host,
                "" if settings.api_key else "; anyone can use it (set --api-key to require a key)")

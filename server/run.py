"""`python -m server`: listen at once, load the model in the background, serve the API with waitress."""

from __future__ import annotations

import _thread
import ipaddress
import logging
import signal
import sys
import threading
import time
import webbrowser

from .config import PROJECT_ROOT, Settings, UserError
from .logfile import LogFile
from .startup import make_engine
from .web.app import create_app
from .web.relay import chatlog
from .web.serve import make_server

log = logging.getLogger(__name__)

CHATLOG_PATH = PROJECT_ROOT / "chatlog.log"


def run_server(settings: Settings) -> int:
    if settings.api_key is not None and not (settings.api_key.isascii() and settings.api_key.isprintable()
                                             and settings.api_key.strip()):
        raise UserError("api_key 只能用 ASCII 字母、数字和符号（HTTP 头无法可靠传送中文等字符）/ The API key must be "
                        "printable ASCII (letters, digits, symbols): HTTP headers cannot carry other characters "
                        "reliably, so no client could send it. Choose another in settings.ini or --api-key.")
    warn_if_exposed(settings)
    if settings.chatlog:
        handler = LogFile(CHATLOG_PATH, max_bytes=10 * 1024 * 1024, backups=5)
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
    stopped = threading.Event()
    stop_on_terminate()
    console_handler = stop_on_console_close(stopped)  # (kept referenced while the server runs)
    try:
        serve_until_interrupted(server)
    except KeyboardInterrupt:
        log.info("停止中 / stopping: running replies end as interrupted")
        engine.close()
        flush(server)
    finally:
        engine.close()
        stopped.set()
    del console_handler
    return 0


def serve_until_interrupted(server) -> None:
    """waitress's event loop, which KeyboardInterrupt leaves. waitress's own run() catches it and then waits up to
    5 s for its request threads, but a streaming reply's thread only ends once the engine ends the reply, which
    the caller does after: every stop took those 5 s, the replies' final events were left unsent, and Windows
    ends a process 5 s after its console closes."""
    from waitress import wasyncore

    wasyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=server._map, use_poll=server.adj.asyncore_use_poll)


def stop_on_terminate() -> None:
    """SIGTERM (a service manager, `docker stop`, `kill`) and on Windows SIGBREAK (Ctrl+Break) stop the server as
    Ctrl+C does: running and queued replies end as interrupted, with their final events and log lines, instead of
    the process dying mid-stream."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupt)


CONSOLE_CLOSE_EVENTS = (2, 5, 6)  # CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT
CONSOLE_CLOSE_WAIT = 4.0  # Windows ends the process 5 s after the console closes: stop within that


def stop_on_console_close(stopped: threading.Event):
    """Windows: closing the console window (or logging off, shutting down) stops the server as Ctrl+C does. No
    signal reaches Python for these, so a console control handler does (SetConsoleCtrlHandler); it returns the
    handler, which must stay referenced. Elsewhere nothing to do."""
    if sys.platform != "win32" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes
    from ctypes import wintypes

    @ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)
    def handler(event: int) -> bool:
        return event in CONSOLE_CLOSE_EVENTS and on_console_close(stopped)

    ctypes.windll.kernel32.SetConsoleCtrlHandler(handler, True)
    return handler


def on_console_close(stopped: threading.Event, wait: float = CONSOLE_CLOSE_WAIT) -> bool:
    """On the thread Windows runs console handlers on: interrupt the main thread (as Ctrl+C) and hold the process
    until the replies have ended and been flushed (Windows ends it when the handler returns)."""
    _thread.interrupt_main()
    stopped.wait(wait)
    return True  # (handled: Windows ends the process now)


def flush(server, seconds: float = 3.0) -> None:
    """Run waitress's loop a little longer, so that the final events written by the handler threads (the
    interrupted replies' ends) reach their clients before the process exits."""
    from waitress import wasyncore

    def busy(channel) -> bool:  # a client connection with a request in progress or output not yet sent
        return bool(getattr(channel, "total_outbufs_len", 0) or getattr(channel, "requests", None))

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(busy(c) for c in list(server._map.values())):
        wasyncore.loop(timeout=0.05, map=server._map, count=1)


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

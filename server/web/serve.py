"""The waitress server: an exclusive listening socket, threads for streams, disconnects reported to the app,
and room for real clients when others are slow on purpose (slowloris).

waitress parses requests on its event loop, so a connection that sends its headers a byte a second holds no
thread, only one of `connection_limit` places: enough such sockets used to lock every client out. The limit
is raised (kept below the 512 sockets select() handles on Windows) and a connection whose request headers are
not complete after HEADER_TIMEOUT seconds is closed.
"""

from __future__ import annotations

import socket

import waitress
from waitress.server import BaseWSGIServer

from ..config import Settings, UserError
from ..engine.sizing import DEFAULT_MAX_BATCH

HEADER_TIMEOUT = 10  # seconds a client may take to send its request line and headers
CONNECTION_LIMIT = 400


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
        server = waitress.create_server(
            app, sockets=[listening_socket(settings.host, settings.port)],
            # every waiting or decoding stream holds a thread; leave some for quick calls
            # (the engine chooses its batch size only once the model has loaded, after this: take the most it may)
            threads=settings.max_queue + (settings.max_batch or max(DEFAULT_MAX_BATCH.values())) + 4,
            channel_request_lookahead=1,  # lets waitress report a disconnected client to the app
            # Flask enforces max_body_bytes with a JSON 413; waitress's own (plain-text) limit stays a backstop
            max_request_body_size=4 * settings.max_body_bytes + 65536,
            ident="my-chatglm2",
            connection_limit=CONNECTION_LIMIT,
            cleanup_interval=1,  # how often slow headers (and idle connections) are looked for
        )
    except (OSError, UnicodeError) as exc:  # in use, no such address, or a host name that cannot be resolved
        raise UserError(f"无法监听 / Cannot listen on {settings.host}:{settings.port}: {getattr(exc, 'strerror', None) or exc}. "
                        "端口可能已被占用（是否已经开着一个？），可在 settings.ini 里改 port，或用 --port 换一个 / "
                        "The port may be in use (is the server already running?): choose another port in "
                        "settings.ini or with --port.") \
            from exc
    close_slow_headers(server)
    return server


def close_slow_headers(server) -> None:
    """Close connections whose request headers take longer than HEADER_TIMEOUT, at waitress's maintenance pass
    (each listening server's; the request being parsed is stamped when a pass first sees it)."""
    for dispatcher in list(server._map.values()):
        if not isinstance(dispatcher, BaseWSGIServer):
            continue

        def maintenance(now, original=dispatcher.maintenance, listening=dispatcher):
            original(now)
            for channel in list(listening.active_channels.values()):
                request = channel.request
                if request is None or request.headers_finished:
                    continue
                first_seen = getattr(request, "first_seen", None)
                if first_seen is None:
                    request.first_seen = now
                elif now - first_seen > HEADER_TIMEOUT:
                    channel.will_close = True

        dispatcher.maintenance = maintenance

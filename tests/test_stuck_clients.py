"""Clients that stop reading, send their headers a byte at a time, or leave logs nowhere to go (issue 24): the
server keeps answering everyone else and holds bounded memory."""

import json
import socket
import time

import pytest
import requests

from server.engine import Update
from server.engine.jobs import EventQueue


@pytest.fixture
def long_model(tiny_checkpoint):
    from server.model.loader import load_model
    from tests.conftest import cpu_plan

    return load_model(tiny_checkpoint, cpu_plan(max_context=2048))


def stuck_stream(url: str, body: dict) -> socket.socket:
    """A client that sends a /stream request and never reads a byte of the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: the window stays small)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_a_reader_that_falls_behind_holds_a_bounded_queue():
    events = EventQueue()
    for i in range(10_000):
        events.put(Update(text="x" * i, completion_tokens=i))
    assert len(events) == EventQueue.MAX_PENDING
    first = [events.get(0) for _ in range(EventQueue.MAX_PENDING)]
    assert [e.completion_tokens for e in first[:-1]] == list(range(EventQueue.MAX_PENDING - 1))
    assert first[-1].completion_tokens == 9_999  # the newest reply is what is kept


def test_stuck_readers_do_not_hold_the_server(serve, engine_for, long_model, caplog):
    engine = engine_for(long_model, max_batch=4, max_queue=8)
    server = serve(engine, write_timeout=2)
    history = [["问" * 200, "答" * 200]] * 20  # a long history: every seed event echoes what the model saw
    stuck = [stuck_stream(server.url, {"query": "讲一个很长的故事", "history": history, "max_length": 2048})
             for _ in range(20)]  # 4 decode, 8 wait, the rest are told 429 (and never read that either)
    try:
        deadline = time.monotonic() + 20
        while len(engine.running_ids) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(engine.running_ids) == 4  # the batch is full of clients that read nothing
        for _ in range(5):  # everyone else is still answered, quickly
            start = time.monotonic()
            assert requests.get(server.url + "/", timeout=5).status_code == 200
            assert requests.get(server.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - start < 2
        # after the write timeout their jobs are stopped and the threads freed: a reader gets its answer
        deadline = time.monotonic() + 60
        while (engine.running_ids or engine.queued_ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not engine.running_ids and not engine.queued_ids
        stopped = [r for r in caplog.records if "stopped reading" in r.getMessage()]
        assert len(stopped) >= 4  # (not ended on their own: the write timeout stopped them)
        answer = requests.post(server.url + "/generate", json={"query": "hi", "max_length": 300}, timeout=30)
        assert answer.status_code == 200 and answer.headers["X-Finish-Reason"] == "length"
    finally:
        for sock in stuck:
            sock.close()


def test_slow_headers_do_not_lock_out_real_clients(serve, engine, monkeypatch):
    import server.web.serve as serve_module

    monkeypatch.setattr(serve_module, "HEADER_TIMEOUT", 2)
    server = serve(engine)
    host, port = server.url.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(150):  # more than waitress's default connection limit (100)
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(sock)
        for round_ in range(3):  # a byte a second each, headers never finished
            for sock in slow:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass
            start = time.monotonic()
            assert requests.get(server.url + "/", timeout=5).status_code == 200
            assert time.monotonic() - start < 2, round_
            time.sleep(1)
        time.sleep(1.5)  # past the header timeout: the server closed them
        closed = 0
        for sock in slow:
            sock.settimeout(2)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(slow)
    finally:
        for sock in slow:
            sock.close()


def test_a_full_disk_costs_one_console_line_a_minute(capsys):
    import logging
    from pathlib import Path

    from server.logfile import LogFile

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here to stand for a full disk")
    handler = LogFile("/dev/full", max_bytes=10 * 1024 * 1024, backups=1)
    logger = logging.getLogger("test.full-disk")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(50):
            logger.warning("record %d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "Traceback" not in err, err
    assert handler.lost == 50

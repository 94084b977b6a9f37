"""Helpers for tests and benches that run `python -m server` in a process of its own."""

from __future__ import annotations

import threading
import time

import requests


def wait_until_ready(url: str, seconds: float = 120) -> bool:
    """Whether the server at `url` says `ready` on /health within `seconds` (asked every 0.2 s, bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).json()["status"] == "ready":
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def last_stream_event(url: str, body: dict, started: threading.Semaphore) -> bytes | None:
    """POST /stream with `body` and read it to its end; `started` is released once the job is named (its
    `: job` comment). The last `data:` line, or None when none came."""
    last = None
    with requests.post(url + "/stream", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b": job"):
                started.release()
            if line.startswith(b"data: "):
                last = line
    return last

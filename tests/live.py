"""Helpers for tests and benches that run `python -m server` in a process of its own."""

from __future__ import annotations

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

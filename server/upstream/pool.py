"""The upstream engines behind a front end: each one's state, the choice of the least busy, and backoff.

An upstream that fails (no connection, a 5xx, a broken stream) is skipped for a while: 2 s after the first
failure, doubling up to a minute. A prober thread asks a skipped one's `/models` again once its time is up, and
a request may try it too; the first answer puts it back in use.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from . import client

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 60.0
PROBE_EVERY_SECONDS = 1.0


@dataclass
class Upstream:
    url: str
    state: str = "unknown"  # unknown (not asked yet), up or down
    in_flight: int = 0
    model: str | None = None  # what its /models lists first: the name its completions need
    max_model_len: int | None = None  # its context, where /models says (vLLM, SGLang, llama.cpp do)
    n_vocab: int | None = None  # its vocabulary with padding, where /models says (llama.cpp does)
    accepts_ids: bool | None = None  # whether it takes token ids as the prompt (None: not tried yet)
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    served: int = 0  # completions it streamed to the end
    last_used: float = field(default=0.0, repr=False)

    def usable(self, now: float) -> bool:
        return self.state != "down" or now >= self.retry_at

    def answered(self) -> None:
        if self.state != "up":
            log.info("upstream %s answers (model %s, context %s)", self.url, self.model, self.max_model_len)
        self.state, self.error, self.failures = "up", None, 0

    def failed(self, error: str) -> None:
        self.failures += 1
        wait = min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** (self.failures - 1))
        if self.state != "down" or self.error != error:
            log.warning("upstream %s: %s; skipped for %.0f s", self.url, error, wait)
        self.state, self.error, self.retry_at = "down", error, time.monotonic() + wait

    def describe(self) -> dict:
        """What /health shows of it."""
        retry = max(0.0, self.retry_at - time.monotonic()) if self.state == "down" else None
        return {"url": self.url, "state": self.state, "in_flight": self.in_flight, "model": self.model,
                "max_context": self.max_model_len, "token_ids": self.accepts_ids, "served": self.served,
                "error": self.error, "retry_in": None if retry is None else round(retry, 1)}


class Pool:
    def __init__(self, urls: list[str], api_key: str | None = None):
        self.upstreams = [Upstream(url) for url in urls]
        self.api_key = api_key
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None

    # -- choosing --------------------------------------------------------------------------------------------
    def candidates(self) -> list[Upstream]:
        """Usable upstreams, least busy first (fewest in-flight requests, then the one unused the longest)."""
        now = time.monotonic()
        with self._lock:
            usable = [u for u in self.upstreams if u.usable(now)]
            return sorted(usable, key=lambda u: (u.state != "up", u.in_flight, u.last_used))

    def take(self, upstream: Upstream) -> None:
        with self._lock:
            upstream.in_flight += 1
            upstream.last_used = time.monotonic()

    def release(self, upstream: Upstream, completed: bool) -> None:
        with self._lock:
            upstream.in_flight -= 1
            upstream.served += completed

    @property
    def any_up(self) -> bool:
        return any(u.state == "up" for u in self.upstreams)

    @property
    def any_usable(self) -> bool:
        now = time.monotonic()
        return any(u.usable(now) for u in self.upstreams)

    @property
    def in_flight(self) -> int:
        return sum(u.in_flight for u in self.upstreams)

    def max_context(self) -> int | None:
        """The smallest context any upstream reports (a request must fit wherever it goes)."""
        known = [u.max_model_len for u in self.upstreams if u.max_model_len]
        return min(known) if known else None

    def errors(self) -> str:
        return "; ".join(u.error or f"{u.url}: {u.state}" for u in self.upstreams)  # an error names its URL

    # -- probing ---------------------------------------------------------------------------------------------
    def probe(self, upstream: Upstream) -> bool:
        """Ask the upstream which model it serves; True when it answered."""
        try:
            listing = client.get_json(upstream.url, "/models", api_key=self.api_key)
        except client.UpstreamError as exc:
            upstream.failed(str(exc))
            return False
        models = [m for m in listing.get("data") or [] if isinstance(m, dict)]
        if models:
            upstream.model = str(models[0].get("id") or upstream.model)
            upstream.max_model_len = context_length(models[0]) or upstream.max_model_len
            meta = models[0].get("meta")
            n_vocab = meta.get("n_vocab") if isinstance(meta, dict) else None
            upstream.n_vocab = n_vocab if isinstance(n_vocab, int) and n_vocab > 0 else upstream.n_vocab
        upstream.answered()
        return True

    def probe_all(self) -> None:
        threads = [threading.Thread(target=self.probe, args=(u,), daemon=True) for u in self.upstreams]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def start_prober(self) -> None:
        """Ask skipped upstreams again once their wait is over, until close()."""
        def run():
            while not self._closed.wait(PROBE_EVERY_SECONDS):
                now = time.monotonic()
                for upstream in self.upstreams:
                    if upstream.state != "up" and now >= upstream.retry_at:
                        self.probe(upstream)

        self._prober = threading.Thread(target=run, name="upstream-prober", daemon=True)
        self._prober.start()

    def close(self) -> None:
        self._closed.set()


def context_length(model: dict) -> int | None:
    """The context length a /models entry reports: vLLM's and SGLang's max_model_len, llama-server's meta.n_ctx
    (the context of one of its slots; its meta.n_ctx_train, the model's training length, is not what it serves)."""
    meta = model.get("meta") if isinstance(model.get("meta"), dict) else {}
    for value in (model.get("max_model_len"), meta.get("n_ctx")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None

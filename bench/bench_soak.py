"""A soak: the real server under mixed load with faults for a while, then SIGTERM; memory and log lines checked.

    python bench/bench_soak.py --minutes 30

`python -m server` runs on a tiny checkpoint (float32, a 2,048-token context, the chat log on) on a loopback
port. Client threads loop until the time is up, each request bounded by a timeout:
- readers: /stream, /v1/chat/completions (streamed and not), /api/chat, read to the end;
- leavers: a stream closed after a few events, a non-streamed request whose socket closes while it waits;
- interrupters: a stream stopped by POST /interrupt with its job id;
- stuck readers: a /stream whose socket never reads (held for `--write-timeout` + a few seconds, then closed).
The server's RSS is sampled every 10 s. At the end, with streams running, the server gets SIGTERM. Printed: RSS
after warm-up, at the end and its slope; requests per kind; whether every job a client saw (X-Job-Id) has its
line in the console log and its record in chatlog.log; how long SIGTERM took.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, url: str, until: float, write_timeout: int):
        self.url, self.until, self.write_timeout = url, until, write_timeout
        self.counts: Counter = Counter()
        self.job_ids: set[str] = set()
        self.lock = threading.Lock()

    def seen(self, kind: str, response=None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if response is not None and response.headers.get("X-Job-Id"):
                self.job_ids.add(response.headers["X-Job-Id"])

    def loop(self, kind: str, action) -> None:
        rng = random.Random(kind)
        while time.monotonic() < self.until:
            try:
                action(rng)
            except (requests.RequestException, OSError) as exc:
                self.seen(f"{kind}: {type(exc).__name__}")
            time.sleep(rng.uniform(0, 0.5))

    def reader(self, rng) -> None:
        route = rng.choice(["stream", "chat", "chat-stream", "ollama"])
        n = rng.randint(8, 200)
        if route == "stream":
            r = requests.post(self.url + "/stream", json={"query": "讲个故事", "max_length": n + 40}, stream=True,
                              timeout=120)
            for _ in r.iter_lines():
                pass
        elif route.startswith("chat"):
            r = requests.post(self.url + "/v1/chat/completions", timeout=120, stream=route == "chat-stream",
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": n,
                                    "stream": route == "chat-stream"})
            for _ in r.iter_lines():
                pass
        else:
            r = requests.post(self.url + "/api/chat", timeout=120, stream=True, json={
                "model": "x", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": n}})
            for _ in r.iter_lines():
                pass
        self.seen(f"read {route} {r.status_code}", r)

    def leaver(self, rng) -> None:
        if rng.random() < 0.5:
            with requests.post(self.url + "/stream", json={"query": "hi", "max_length": 1500}, stream=True,
                               timeout=60) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > rng.randint(2, 30):
                        break
            self.seen(f"left a stream {r.status_code}", r)
        else:
            try:
                requests.post(self.url + "/v1/chat/completions", timeout=rng.uniform(0.2, 1.5),
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500})
            except requests.Timeout:
                pass
            self.seen("left a non-streamed request")

    def interrupter(self, rng) -> None:
        with requests.post(self.url + "/stream", json={"query": "hi", "max_length": 1500, "delta": True},
                           stream=True, timeout=60) as r:
            job = r.headers.get("X-Job-Id")
            for i, _ in enumerate(r.iter_lines()):
                if i == 10 and job:
                    requests.post(self.url + "/interrupt", json={"id": job}, timeout=10)
        self.seen(f"interrupted {r.status_code}", r)

    def stuck(self, rng) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        body = json.dumps({"query": "长故事", "history": [["问" * 300, "答" * 300]] * 5, "max_length": 2000}).encode()
        sock.sendall(b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(min(self.write_timeout + 5, max(self.until - time.monotonic(), 0)))
        sock.close()
        self.seen("stuck reader")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--write-timeout", type=int, default=20)
    args = parser.parse_args()

    from tests.checkpoint_factory import write_checkpoint
    from tests.live import wait_until_ready

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = write_checkpoint(work / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    console = work / "console.txt"
    env = {**os.environ, "CHATGLM2_SETTINGS_FILE": str(work / "none.ini")}
    with open(console, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--offline",
                                 "--model-dir", str(model), "--quantize", "16", "--dtype", "float32",
                                 "--max-context", "2048", "--prompt-cache-disk-mb", "0",
                                 "--write-timeout", str(args.write_timeout)],
                                cwd=ROOT, env=env, stdout=out, stderr=out)
    if not wait_until_ready(url):
        proc.kill()
        raise SystemExit(f"the server did not get ready: {console}")
    chatlog = ROOT / "chatlog.log"
    chatlog_start = chatlog.stat().st_size if chatlog.exists() else 0
    start = time.monotonic()
    soak = Soak(url, start + args.minutes * 60, args.write_timeout)
    plan = [("reader", soak.reader)] * 4 + [("leaver", soak.leaver)] * 2 + [("interrupter", soak.interrupter),
                                                                          ("stuck", soak.stuck), ("stuck", soak.stuck)]
    threads = [threading.Thread(target=soak.loop, args=plan_item, daemon=True) for plan_item in plan]
    for thread in threads:
        thread.start()
    samples, cache = [], []  # (seconds, RSS MB); the prefix cache's MB (bounded by --prompt-cache-mb, 1 GB)
    while time.monotonic() < soak.until:
        samples.append((time.monotonic() - start, rss_mb(proc.pid)))
        try:
            cache.append(requests.get(url + "/health", timeout=5).json()["prompt_cache"]["mb"])
        except (requests.RequestException, KeyError, TypeError):
            pass
        time.sleep(10)
    # SIGTERM while streams run
    closing = [threading.Thread(target=soak.reader, args=(random.Random(i),), daemon=True) for i in range(3)]
    for thread in closing:
        thread.start()
    time.sleep(1)
    stop = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stopped_in = time.monotonic() - stop
    for thread in threads + closing:
        thread.join(timeout=30)

    text = console.read_text(encoding="utf-8", errors="replace")
    logged = set(re.findall(r"job (\w{12}) ", text))
    records = set()
    if chatlog.exists():
        with open(chatlog, encoding="utf-8") as f:
            f.seek(chatlog_start)
            for line in f:
                records.update(re.findall(r'"id": "(\w{12})"', line))
    warm = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]
    minutes = (samples[-1][0] - 60) / 60  # the span after the first minute
    slope = (warm[-1] - warm[0]) / minutes if minutes >= 1 else 0.0  # (none for runs under 2 minutes)
    print(f"soak: {args.minutes:.0f} min, write timeout {args.write_timeout} s, server RSS after the first minute "
          f"{warm[0]:.0f} MB, at the end {warm[-1]:.0f} MB, peak {max(r for _, r in samples):.0f} MB, slope "
          f"{slope:+.2f} MB/min; the prefix cache held {cache[0] if cache else 0:.0f} MB at first, "
          f"{cache[-1] if cache else 0:.0f} MB at the end (RSS minus cache: {warm[0] - (cache[0] if cache else 0):.0f} "
          f"-> {warm[-1] - (cache[-1] if cache else 0):.0f} MB)")
    print("requests: " + ", ".join(f"{kind} {n}" for kind, n in sorted(soak.counts.items())))
    print(f"jobs the clients saw: {len(soak.job_ids)}; without a console line: {len(soak.job_ids - logged)}; "
          f"without a chat-log record: {len(soak.job_ids - records)}")
    print(f"SIGTERM with streams running: exit code {proc.returncode} after {stopped_in:.1f} s; tracebacks in the "
          f"console: {text.count('Traceback')}")


if __name__ == "__main__":
    main()

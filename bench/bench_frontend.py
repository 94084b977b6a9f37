"""The front end's cost: N concurrent clients through `python -m server --backend URL` versus the same clients
talking to the upstream engine directly.

    python bench/bench_frontend.py                       # a stand-in engine on the tiny model, 20 ms per step
    python bench/bench_frontend.py --upstream http://127.0.0.1:8080/v1 --model-dir DIR
                                                         # a real engine (llama.cpp's llama-server, vLLM, ...)

Direct: each client streams `POST /v1/completions` with the prompt's token ids (what the front end sends).
Through the front end: each client streams `POST /v1/chat/completions` with the same chat, so the front end
validates, fits and formats the prompt, relays every event and reframes it. Both ask greedy replies of --tokens
tokens (the random tiny model never ends early). Printed per N: aggregate tokens/s, median time to the first
token, the ratio front end / direct measured in the same run (1.0 = no cost), and the front end process's CPU
time per relayed token (what bounds it when the engine is faster than one core of Python can relay). The
front end runs as its own process, as it does for a user; the stand-in engine (tests/upstream_standin.py) batches
like a real one and its pace is set with --pace-ms (a 6B model on a GPU steps in ~15-30 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil  # installed with accelerate
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "请用三句话介绍一下北京的历史。"


def stream_tokens(url: str, body: dict, field: str) -> tuple[float, int]:
    """(seconds to the first token, tokens) of one streamed OpenAI answer; `field` is the text's path."""
    start = time.perf_counter()
    first, tokens = None, 0
    with requests.post(url, json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                text = choice["text"] if field == "text" else (choice.get("delta") or {}).get("content")
                if text:
                    tokens += 1
                    first = first or time.perf_counter() - start
            usage = event.get("usage")
            if usage:
                tokens = usage["completion_tokens"]
    return first or 0.0, tokens


def run_clients(n: int, call) -> tuple[float, float, int]:
    """(aggregate tokens/s, median TTFT, tokens) of n clients started together."""
    results = [None] * n

    def client(i):
        results[i] = call()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return tokens / wall, statistics.median(r[0] for r in results), tokens


def start_standin(pace_ms: float, max_context: int, folder: Path):
    """A stand-in engine on the tiny model in this process; returns (base URL, tokenizer folder)."""
    import torch

    from server.engine import Engine
    from server.model.loader import load_model
    from tests.checkpoint_factory import write_checkpoint
    from tests.conftest import LiveServer, cpu_plan
    from tests.upstream_standin import StandIn

    torch.set_num_threads(1)  # leave the other core to the front end
    loaded = load_model(write_checkpoint(folder), cpu_plan(max_context=max_context))
    forward = loaded.model.forward

    def paced(*args, **kwargs):
        time.sleep(pace_ms / 1000)
        return forward(*args, **kwargs)

    loaded.model.forward = paced
    engine = Engine(max_queue=64, max_batch=16)
    engine.attach(loaded)
    standin = StandIn(engine)
    server = LiveServer(engine, app=standin.app(), max_queue=64, max_batch=16)
    return server.url + "/v1", folder


def start_front_end(upstream: str, model_dir: Path, max_context: int | None) -> tuple[subprocess.Popen, str]:
    from tests.live import wait_until_ready
    from tests.wine_helpers import free_port

    port = free_port()
    args = [sys.executable, "-m", "server", "--backend", upstream, "--model-dir", str(model_dir), "--port",
            str(port), "--offline", "--no-chatlog", "--max-queue", "64", "--max-batch", "32"]
    if max_context:
        args += ["--max-context", str(max_context)]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "CHATGLM2_SETTINGS_FILE": os.devnull},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if wait_until_ready(url):
        return proc, url
    proc.kill()
    raise SystemExit("the front end did not get ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", help="base URL of a running engine (default: a stand-in in this process)")
    parser.add_argument("--model-dir", type=Path, help="folder with the engine's tokenizer.model (with --upstream)")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="the stand-in's time per decode step")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=512)
    args = parser.parse_args()

    from server.model.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.upstream:
            upstream, model_dir = args.upstream.rstrip("/"), args.model_dir
            max_context = args.max_context
        else:
            upstream, model_dir = start_standin(args.pace_ms, args.max_context, Path(tmp) / "tiny")
            max_context = None  # the stand-in reports it
        tokenizer = load_tokenizer(model_dir)
        ids = tokenizer.build_prompt(QUERY, [])
        model = requests.get(upstream + "/models", timeout=10).json()["data"][0]["id"]
        proc, front = start_front_end(upstream, model_dir, max_context)
        try:
            direct_body = {"model": model, "prompt": ids, "max_tokens": args.tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}}
            front_body = {"model": model, "messages": [{"role": "user", "content": QUERY}],
                          "max_tokens": args.tokens, "temperature": 0, "stream": True,
                          "stream_options": {"include_usage": True}}
            direct = lambda: stream_tokens(upstream + "/completions", direct_body, "text")  # noqa: E731
            through = lambda: stream_tokens(front + "/v1/chat/completions", front_body, "delta")  # noqa: E731
            direct(), through()  # warm-up
            where = args.upstream or f"stand-in on the tiny model, {args.pace_ms:g} ms per step"
            print(f"upstream: {where}; {args.tokens} tokens per reply, prompt {len(ids)} tokens, greedy")
            print(f"{'clients':>7} {'direct tok/s':>13} {'front tok/s':>12} {'ratio':>6} "
                  f"{'direct TTFT':>12} {'front TTFT':>11} {'front CPU/token':>16}")
            front_process = psutil.Process(proc.pid)
            for n in map(int, args.clients.split(",")):
                d_rate, d_ttft, d_tokens = run_clients(n, direct)
                cpu = sum(front_process.cpu_times()[:2])
                f_rate, f_ttft, f_tokens = run_clients(n, through)
                cpu = sum(front_process.cpu_times()[:2]) - cpu
                assert d_tokens == f_tokens == n * args.tokens, (d_tokens, f_tokens)
                print(f"{n:>7} {d_rate:>13.1f} {f_rate:>12.1f} {f_rate / d_rate:>6.3f} {d_ttft * 1000:>10.0f}ms "
                      f"{f_ttft * 1000:>9.0f}ms {cpu / f_tokens * 1e6:>14.0f}µs")
        finally:
            proc.kill()


if __name__ == "__main__":
    main()

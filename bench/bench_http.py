"""HTTP streaming cost: tokens/s and time to first event through `POST /stream` versus the engine alone.

    python bench/bench_http.py                 # 2-layer slice of the 6B shape, 4-bit (the CPU default)
    python bench/bench_http.py --precision bfloat16 --tokens 64

Both paths use the same loaded model and the same greedy request, alternating, median of --repeats after a
warm-up. The HTTP client is a plain socket reading the chunked stream, so client overhead is minimal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import engine_generate, plan_for_precision, prepare_checkpoint  # noqa: E402

QUERY = "请用三句话介绍一下北京的历史。"


def http_generate(port: int, tokens: int):
    """(time to first data event, decode tokens/s) of one /stream request over a socket."""
    body = json.dumps({"query": QUERY, "max_length": 10**6, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    start = time.perf_counter()
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    first, data = None, b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        if first is None and b"data: [" in chunk:
            first = time.perf_counter() - start
        data += chunk
    total = time.perf_counter() - start
    sock.close()
    done = json.loads(data.split(b"event: done\r\n" if b"event: done\r\n" in data else b"event: done\n")[1]
                      .split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert done["completion_tokens"] == tokens, done
    return first, (tokens - 1) / (total - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--precision", default="4")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()

    from server.config import Settings
    from server.engine import Engine
    from server.model.loader import load_model
    from server.web.app import create_app
    from server.web.serve import make_server

    folder = prepare_checkpoint(args.dir, args.layers, args.device)
    loaded = load_model(folder, plan_for_precision(args.precision, args.device))
    # the context is cut so that every reply is exactly --tokens long, through both paths
    prompt_len = len(loaded.tokenizer.build_prompt(QUERY, []))
    loaded.plan = dataclasses.replace(loaded.plan, max_context=prompt_len + args.tokens)
    engine = Engine()
    engine.attach(loaded)
    settings = Settings(host="127.0.0.1", port=0, chatlog=False)
    server = make_server(create_app(settings, engine), settings)
    threading.Thread(target=server.run, daemon=True).start()

    direct, http = [], []
    for i in range(args.repeats + 1):
        d, h = engine_generate(engine, QUERY, args.tokens), http_generate(server.effective_port, args.tokens)
        if i:
            direct.append(d)
            http.append(h)
    server.close()
    engine.close()
    e_ttft, e_tps = (statistics.median(x[k] for x in direct) for k in (0, 1))
    h_ttft, h_tps = (statistics.median(x[k] for x in http) for k in (0, 1))
    print(f"\nprecision {args.precision}, reply of {args.tokens} tokens, greedy, median of {args.repeats}")
    print(f"engine alone : {e_tps:6.1f} tok/s, first token {e_ttft * 1000:6.0f} ms")
    print(f"HTTP /stream : {h_tps:6.1f} tok/s, first event {h_ttft * 1000:6.0f} ms")
    print(f"ratio HTTP/engine: tok/s {h_tps / e_tps:.3f}, time to first {h_ttft / e_ttft:.3f}")


if __name__ == "__main__":
    main()

"""The chat page on a long reply: time in Chromium against the same request answered without streaming.

    python bench/bench_page.py                  # a ~4,000-token reply from the tiny test model
    python bench/bench_page.py --tokens 8000

The tiny checkpoint (tests/checkpoint_factory.py) never ends a reply early, so the reply runs to max_length.
Three timings of the same greedy request, in one run on one server: `/generate` without streaming (the
reference), the seed's `/stream` format read by a plain HTTP client (the whole reply twice in every event), and
the page in Debian's Chromium (delta events, one DOM update per animation frame), from pressing Enter to the
finished reply on screen. Printed with the page's ratio to the reference (the goal is at most 1.2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "请写一篇很长的文章"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="context, and so about the reply's length")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    import requests
    from playwright.sync_api import sync_playwright

    from server.engine import Engine
    from server.model.loader import load_model
    from tests.checkpoint_factory import write_checkpoint
    from tests.conftest import LiveServer, cpu_plan

    folder = write_checkpoint(Path(tempfile.mkdtemp(prefix="bench-page-")))
    loaded = load_model(folder, cpu_plan(max_context=args.tokens))
    loaded = dataclasses.replace(loaded, plan=dataclasses.replace(loaded.plan, max_context=args.tokens))
    engine = Engine()
    engine.attach(loaded)
    server = LiveServer(engine)
    body = {"query": QUERY, "history": [], "answer_prefix": "", "max_length": args.tokens, "top_p": 0.7,
            "temperature": 0}
    try:
        start = time.perf_counter()
        plain = requests.post(server.url + "/generate", json={**body, "stream": False}, timeout=600)
        reference = time.perf_counter() - start
        reply = plain.text

        start = time.perf_counter()
        seed = requests.post(server.url + "/stream", json=body, timeout=600)
        seed_seconds = time.perf_counter() - start
        seed_mb = len(seed.content) / 1e6

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            state = {"version": 1, "lang": "zh", "convs": [{"id": "bench", "title": "bench", "style": "custom",
                     "params": {"temperature": 0, "top_p": 0.7, "max_length": args.tokens}, "pairs": []}]}
            page.goto(server.url + "/health")
            page.evaluate("s => localStorage.setItem('chatglm2.state.v1', s)", json.dumps(state))
            page.goto(server.url + "/ui/")
            page.wait_for_function("document.querySelector('#empty .facts')?.textContent.includes('cpu')")
            page.fill("#input", QUERY)
            start = time.perf_counter()
            page.press("#input", "Enter")
            page.wait_for_function("!document.querySelector('#send').classList.contains('stop')", timeout=600000)
            page_seconds = time.perf_counter() - start
            shown = page.evaluate("JSON.parse(localStorage.getItem('chatglm2.state.v1')).convs[0].pairs[0].a")
            browser.close()
    finally:
        server.close()
        engine.close()

    tokens = len(loaded.tokenizer.sp.encode(reply))
    print(f"reply: {len(reply)} characters, ~{tokens} tokens; the page shows the same text: {shown == reply}")
    print(f"/generate, not streamed (reference): {reference:.2f} s")
    print(f"/stream, the seed's format, plain client: {seed_seconds:.2f} s, {seed_mb:.1f} MB on the wire "
          f"({seed_seconds / reference:.2f} x the reference)")
    print(f"the page (delta events, one update per frame): {page_seconds:.2f} s "
          f"({page_seconds / reference:.2f} x the reference; goal <= 1.2)")


if __name__ == "__main__":
    main()

"""Fitting a long history into the context: the cost before a job is queued (issue: 2,000 rounds took 42 s).

    python bench/bench_budget.py            # the real tokenizer when ../shared has it, else a tiny one

Prints the time of budget.fit_prompt for 2,000 rounds (~0.56 MB of chat), and, for reference on the same
machine, the old approach (re-tokenize the whole prompt after each dropped round) on 200 rounds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import REAL_TOKENIZER  # noqa: E402
from server.engine.budget import GenerationRequest, fit_prompt  # noqa: E402
from server.model.tokenizer import ChatGLM2Tokenizer  # noqa: E402
from tests.test_budget import one_at_a_time as old_fit  # noqa: E402  (the old loop, kept as the tests' reference)


def main() -> None:
    if REAL_TOKENIZER.exists():
        tokenizer = ChatGLM2Tokenizer(REAL_TOKENIZER)
    else:
        from tests.checkpoint_factory import train_tokenizer

        tokenizer = ChatGLM2Tokenizer(train_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer.model"))
    rounds = [(f"第{i}个问题：北京今天的天气怎么样？What about tomorrow?" * 2,
               f"回答{i}：晴，最高气温二十度。It will be sunny. " * 3) for i in range(2000)]
    request = GenerationRequest(query="你好", history=rounds)
    size = sum(len(q.encode()) + len(a.encode()) for q, a in rounds) / 1e6
    start = time.perf_counter()
    fitted = fit_prompt(tokenizer, request, 8192, 512)
    print(f"fit_prompt, 2,000 rounds (~{size:.2f} MB): {time.perf_counter() - start:.2f} s, "
          f"{fitted.dropped_rounds} dropped, prompt {len(fitted.ids)} tokens")
    short = GenerationRequest(query="你好", history=rounds[:200])
    start = time.perf_counter()
    new = fit_prompt(tokenizer, short, 8192, 512).dropped_rounds
    new_s = time.perf_counter() - start
    start = time.perf_counter()
    old = old_fit(tokenizer, short, 8192 - 512)
    print(f"200 rounds: now {new_s:.3f} s, the old loop {time.perf_counter() - start:.2f} s (same result: {new == old})")


if __name__ == "__main__":
    main()

"""Why a short prompt waits on the CPU (issue 22): one forward pass of M prompt tokens through the quantized
model, with the layers as the loader set them up (`default`), forced to expand their weights to bfloat16
(`dense`), and forced onto torch's int8/int4 kernel (`kernel`); M = 1 is one decode step.

    python bench/bench_short_prompt.py --dir /tmp/bench-full --bits 4     # bench_cpu.py's checkpoint

Prints the loader's kernel choice and, per M, the best of two runs (one for the forced variants) in seconds and
in decode steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cpu_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    cpu_model.add_options(parser)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 20, 32, 64])
    args = parser.parse_args()
    import torch
    from transformers import DynamicCache

    from server.model.cpu_quant import QuantizedLinear
    from server.model.forward import prefill

    loaded = cpu_model.load(args)
    model, tok = loaded.model, loaded.tokenizer
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    chosen = [layer.dense_from_tokens for layer in layers]
    text = tok.sp.encode("你好，请介绍一下北京的名胜古迹和历史。" * 40)

    def forward_seconds(m: int, repeat: int) -> float:
        ids = (tok.prompt_prefix() + text)[:m]
        best = float("inf")
        for _ in range(repeat):
            with torch.inference_mode():
                cache = DynamicCache(config=model.config)
                start = time.perf_counter()
                prefill(model, ids, cache)
                best = min(best, time.perf_counter() - start)
        return best

    def with_threshold(rows: int | None, m: int) -> float:
        for layer, own in zip(layers, chosen):
            layer.dense_from_tokens = own if rows is None else rows
        try:
            return forward_seconds(m, 2 if rows is None else 1)
        finally:
            for layer, own in zip(layers, chosen):
                layer.dense_from_tokens = own

    step = with_threshold(None, 1)
    for m in args.tokens:
        default, dense, kernel = with_threshold(None, m), with_threshold(1, m), with_threshold(sys.maxsize, m)
        print(f"M={m:3}: default {default:.2f} s ({default / step:.1f} steps), dense {dense:.2f} s, "
              f"kernel {kernel:.2f} s", flush=True)


if __name__ == "__main__":
    main()

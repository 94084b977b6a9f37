"""Where a CPU decode step's time goes (issue 22): one stream, the quantized full-size model, a short context.

    python bench/profile_cpu_decode.py --dir /tmp/bench-full --bits 8 --int8 onednn   # bench_cpu.py's checkpoint

Loads the model as the server would (or with the int8 kernel forced), times bare decode steps, then profiles a
few of them with torch.profiler: the share of the step spent in the quantized matmuls (each QuantizedLinear's
own time, its activations' quantizing included) against everything else, and the top operators by self CPU time.
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
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from server.model.cpu_quant import QuantizedLinear
    from server.model.forward import decode_one_token, prefill

    loaded = cpu_model.load(args)
    model, tok = loaded.model, loaded.tokenizer
    ids = (tok.prompt_prefix() + tok.sp.encode("北京是中国的首都。Beijing is old. " * 400))[:args.context]
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    spent = {"linear": 0.0}

    def timed_forward(module, inputs, output):  # forward hooks: the time of each quantized layer's own call
        spent["linear"] += time.perf_counter() - module.started

    def start(module, inputs):
        module.started = time.perf_counter()

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        token = int(prefill(model, ids, cache).argmax())
        decode_one_token(model, token, cache)
        hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(start),
                                                 layer.register_forward_hook(timed_forward))]
        begin = time.perf_counter()
        for _ in range(args.steps):
            decode_one_token(model, token, cache)
        step = (time.perf_counter() - begin) / args.steps
        for h in hooks:
            h.remove()
        linear = spent["linear"] / args.steps
        print(f"decode step {step * 1e3:.1f} ms ({1 / step:.2f} tok/s): quantized matmuls {linear * 1e3:.1f} ms "
              f"({linear / step:.0%}), the rest {(step - linear) * 1e3:.1f} ms", flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                decode_one_token(model, token, cache)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    main()

"""Where a GPU decode step's time goes (issue 22's GPU part): one stream, float16, short and long context.

    python bench/profile_gpu_decode.py --dir /tmp/glm-bench/float    # a checkpoint of bench_gpu_models.py

For each context length: the time of one decode step of the bare model (transformers' forward over a
DynamicCache, CUDA synchronized) and of the engine's whole step (its Batch, sampling and reporting included,
from an Engine job's own timing); then torch.profiler's top operators of 10 bare steps, by CPU and by CUDA
time. The GPU's bandwidth bound for one step (the float16 weights read once) is printed beside them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--contexts", type=int, nargs="*", default=[64, 32000])
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from server.engine import Engine
    from server.engine.budget import GenerationRequest
    from server.model.forward import decode_one_token, prefill
    from server.model.loader import load_model
    from server.model.profiles import Plan

    loaded = load_model(args.dir, Plan("cuda", 16, "float16", 32768, "bench", "bench"))
    model, tok = loaded.model, loaded.tokenizer
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"GPU {torch.cuda.get_device_name()}: float16 weights {weights / 1e9:.2f} GB; one read at 4.8 TB/s: "
          f"{weights / 4.8e12 * 1e3:.2f} ms", flush=True)

    def timed(fn, steps=20) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3

    engine = Engine(max_batch=1, prompt_cache_mb=0)
    engine.attach(loaded)
    try:
        for length in args.contexts:
            ids = (tok.prompt_prefix() + tok.sp.encode("北京是中国的首都。Beijing is old. " * 4000))[:length]
            with torch.inference_mode():
                cache = DynamicCache(config=model.config)
                token = int(prefill(model, ids, cache).argmax())
                bare = timed(lambda token=token, cache=cache: decode_one_token(model, token, cache))
            done = engine.submit(GenerationRequest(query="", prompt_ids=ids, max_new_tokens=33, temperature=0)
                                 ).wait(timeout=300)
            whole = (done.seconds - done.first_token_seconds) / max(done.completion_tokens - 1, 1) * 1e3
            print(f"context {length}: bare forward {bare:.2f} ms/step, engine step {whole:.2f} ms/step "
                  f"({1e3 / whole:.1f} tok/s)", flush=True)
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    decode_one_token(model, token, cache)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8), flush=True)
            del cache
            torch.cuda.empty_cache()
    finally:
        engine.close()


if __name__ == "__main__":
    main()

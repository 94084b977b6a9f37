"""The GLM models on a GPU: memory and speed per model and profile, and one 32k-token prompt (issue: the GLM
family). Run where a CUDA GPU is:

    python bench/bench_gpu_models.py --dir /tmp/glm            # writes the checkpoints when missing

Writes a full-size random ChatGLM2-6B in the 32k models' shape (32,768 positions, rope_ratio 16; ChatGLM3-6B and
the 8k models have the same tensors, so the same memory and speed), and from it a chatglm2-6b-int4 checkpoint
packed as the reference packs it. Then, each through the engine (`Engine`): GPU memory after loading
(allocated), one stream's decode tok/s (64 greedy tokens after a short prompt), and for the float16 model one
prompt of ~32,000 tokens: its time to first token, the peak memory while it ran (in pieces of
`sizing.PROMPT_PIECE` tokens) and the decode tok/s at that length. `--budget` seconds bound the whole run: parts
that would start later are skipped and said so.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import SIX_B  # noqa: E402

GIB = 1024**3
RUNS = [("float16 source (chatglm2-6b-32k shape)", "float", 16, True), ("float16 source", "float", 4, False),
        ("chatglm2-6b-int4", "int4", 16, False), ("chatglm2-6b-int4", "int4", 8, False),
        ("chatglm2-6b-int4", "int4", 4, False)]


def prepare(root: Path) -> tuple[Path, Path]:
    from tests.checkpoint_factory import write_checkpoint, write_int4_checkpoint

    float_dir, int4_dir = root / "float", root / "int4"
    start = time.perf_counter()
    if not (float_dir / "config.json").exists():
        write_checkpoint(float_dir, num_layers=28, shards=7, rope_ratio=16, **SIX_B)
    if not (int4_dir / "config.json").exists():
        write_int4_checkpoint(int4_dir, float_dir)
    sizes = [sum(f.stat().st_size for f in d.glob("pytorch_model*.bin")) / 1e9 for d in (float_dir, int4_dir)]
    print(f"checkpoints: float16 {sizes[0]:.2f} GB, int4 {sizes[1]:.2f} GB ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return float_dir, int4_dir


def measure(folder: Path, bits: int, long_prompt: bool) -> dict:
    import torch

    from server.engine import Engine
    from server.engine.budget import GenerationRequest
    from server.model.loader import load_model
    from server.model.profiles import Plan

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loaded = load_model(folder, Plan("cuda", bits, "float16", 32768, "bench", "bench"))
    out = {"load_s": time.perf_counter() - start, "loaded_gib": torch.cuda.memory_allocated() / GIB}
    engine = Engine(max_batch=1, prompt_cache_mb=0)
    engine.attach(loaded)
    try:
        short = GenerationRequest(query="介绍一下北京的名胜古迹。" * 4, max_new_tokens=64, temperature=0)
        engine.submit(short).wait(timeout=120)  # (first CUDA kernels)
        done = engine.submit(short).wait(timeout=120)
        out["tok_s"] = (done.completion_tokens - 1) / max(done.seconds - done.first_token_seconds, 1e-9)
        if long_prompt:
            tok = loaded.tokenizer
            ids = (tok.prompt_prefix() + tok.sp.encode("北京是中国的首都，历史悠久。Beijing is old. " * 4000))[:32000]
            torch.cuda.reset_peak_memory_stats()
            done = engine.submit(GenerationRequest(query="", prompt_ids=ids, max_new_tokens=32, temperature=0)
                                 ).wait(timeout=300)
            out.update(long_prompt=len(ids), long_ttft_s=done.first_token_seconds,
                       long_peak_gib=torch.cuda.max_memory_allocated() / GIB,
                       long_tok_s=(done.completion_tokens - 1) / max(done.seconds - done.first_token_seconds, 1e-9))
    finally:
        engine.close()
        del loaded, engine
        gc.collect()
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/glm-bench"))
    parser.add_argument("--budget", type=float, default=480)
    args = parser.parse_args()
    import torch

    began = time.perf_counter()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folders = dict(zip(("float", "int4"), prepare(args.dir)))
    profile = {16: "high float16", 8: "mid 8-bit", 4: "low NF4"}
    for name, source, bits, long_prompt in RUNS:
        if time.perf_counter() - began > args.budget:
            print(f"{name}, {profile[bits]}: skipped (past the budget of {args.budget:.0f} s)", flush=True)
            continue
        r = measure(folders[source], bits, long_prompt)
        line = (f"{name:40} {profile[bits]:12}: load {r['load_s']:5.1f} s, {r['loaded_gib']:5.2f} GiB after loading, "
                f"{r['tok_s']:5.1f} tok/s")
        if long_prompt:
            line += (f"; {r['long_prompt']}-token prompt: first token {r['long_ttft_s']:.2f} s, peak "
                     f"{r['long_peak_gib']:.2f} GiB, then {r['long_tok_s']:.1f} tok/s")
        print(line, flush=True)
    print(f"total {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()

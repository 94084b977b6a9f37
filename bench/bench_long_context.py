"""Peak memory of a long prompt (the 32k models): what one prefill adds over the loaded model, by prompt length
and by how it is cut into chunks.

    python bench/bench_long_context.py                       # tiny and medium slices, 8k/16k/32k tokens
    python bench/bench_long_context.py --slice medium --tokens 32768 --chunks 0 2048

Each measurement runs in a fresh process (the peak RSS, ru_maxrss, only grows): load the slice in bfloat16 on
the CPU, note the RSS, run the prompt through the engine's own prefill (`model/forward.prefill`) in chunks of
`chunk` tokens (0: whole), and report the peak over the loaded RSS beside the KV cache's own size. The "medium"
slice is ChatGLM2-6B at full width (hidden 4096, 32 heads, 2 key/value groups, ffn 13,696) with one layer and a
small vocabulary: the activations per layer are the full model's, so the full model's peak is its weights plus
this figure's non-cache part plus 28 layers of cache (printed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLICES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                 ffn_hidden_size=128),
    "medium": dict(hidden_size=4096, num_layers=1, num_attention_heads=32, kv_channels=128, multi_query_group_num=2,
                   ffn_hidden_size=13696),
}
FULL_LAYERS = 28
KV_BYTES_PER_TOKEN_LAYER = 2 * 2 * 128 * 2  # keys and values, 2 groups of 128, bfloat16


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(folder: str, tokens: int, chunk: int) -> dict:
    """(in the child process) the peak RSS over the loaded one for one prefill."""
    import torch
    from transformers import DynamicCache

    from server.model.forward import prefill
    from server.model.loader import load_model
    from tests.conftest import cpu_plan

    loaded = load_model(Path(folder), cpu_plan(16, "bfloat16", max_context=tokens + 8))
    base = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = (loaded.tokenizer.prompt_prefix() + loaded.tokenizer.sp.encode("你好 hello world " * tokens))[:tokens]
    start = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache(config=loaded.model.config)
        step = chunk or tokens
        for i in range(0, tokens, step):
            prefill(loaded.model, ids[i:i + step], cache)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    layers = loaded.model.config.num_hidden_layers
    kv_mb = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 2**20
    return {"tokens": tokens, "chunk": chunk, "loaded_mb": round(base), "peak_over_loaded_mb":
            round(max(peak, peak_before) - base), "kv_mb": round(kv_mb), "layers": layers,
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slice", choices=list(SLICES), nargs="*", default=list(SLICES))
    parser.add_argument("--tokens", type=int, nargs="*", default=[8192, 16384, 32768])
    parser.add_argument("--chunks", type=int, nargs="*", default=[0, 2048])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, tokens, chunk = args.child
        print(json.dumps(measure(folder, int(tokens), int(chunk))))
        return

    from tests.checkpoint_factory import write_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    for name in args.slice:
        folder = write_checkpoint(work / name, seed=0, shards=1, seq_length=32768, rope_ratio=16, **SLICES[name])
        for tokens in args.tokens:
            for chunk in args.chunks:
                out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(tokens), str(chunk)],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(f"{name} {tokens} chunk {chunk}: failed ({out.returncode}) {out.stderr[-300:]}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                activations = row["peak_over_loaded_mb"] - row["kv_mb"]
                full_kv = tokens * KV_BYTES_PER_TOKEN_LAYER * FULL_LAYERS / 2**20
                print(f"{name:6} {tokens:6} tokens, chunk {chunk or 'whole':>5}: peak +{row['peak_over_loaded_mb']:6} MB "
                      f"over the loaded model (KV {row['kv_mb']} MB, the rest {activations} MB), {row['seconds']} s"
                      + (f"; full model: KV {full_kv:.0f} MB + {activations} MB" if name == "medium" else ""))


if __name__ == "__main__":
    main()

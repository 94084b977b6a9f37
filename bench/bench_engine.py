"""Engine cost versus a bare `model.generate`, per precision, plus peak RAM of conversion and loading.

    python bench/bench_engine.py                    # a 2-layer slice of the 6B shape, every CPU precision
    python bench/bench_engine.py --layers 28 --precisions 4 --device cuda   # the full shape on a GPU

The checkpoint has random weights in the real ChatGLM2-6B shape (hidden 4096, 32 heads, 2 KV groups, FFN 13696,
vocabulary 65024), so timings per layer match the real model; replies never end early (eos is suppressed).
Each figure is the median of --repeats runs after one warm-up run. Decode tokens/s excludes the first token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIX_B = dict(hidden_size=4096, num_attention_heads=32, kv_channels=128, multi_query_group_num=2,
             ffn_hidden_size=13696, seq_length=32768, padded_vocab_size=65024)
REAL_TOKENIZER = ROOT.parent / "shared" / "chatglm2" / "tokenizer.model"


def prepare_checkpoint(folder: Path | None, layers: int, device: str) -> Path:
    """The bench checkpoint (written once into `folder`), with the machine and shape printed."""
    import torch

    from tests.checkpoint_factory import write_checkpoint

    folder = folder or Path(tempfile.mkdtemp(prefix="bench-chatglm2-"))
    if not (folder / "config.json").exists():
        tokenizer = REAL_TOKENIZER if REAL_TOKENIZER.exists() else None
        write_checkpoint(folder, num_layers=layers, shards=2, tokenizer=tokenizer, **SIX_B)
    size = sum(f.stat().st_size for f in folder.glob("pytorch_model-*.bin")) / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}")
    print(f"checkpoint: ChatGLM2-6B shape, {layers} layers, {size:.2f} GB of float16 shards in {folder}")
    return folder


def plan_for_precision(precision: str, device: str):
    from server.model.profiles import Plan

    bits = int(precision) if precision.isdigit() else 16
    dtype = precision if bits == 16 else ("float16" if device == "cuda" else "bfloat16")
    return Plan(device, bits, dtype, 8192, "bench", "bench")


def peak_rss_of(code: str) -> tuple[float, float, float]:
    """Run `code` in a fresh Python: (peak RSS, anonymous RSS after, file-backed RSS after) in GB.

    File-backed pages (the memory-mapped checkpoint) count in RSS but the kernel can drop them under pressure;
    anonymous memory is what really has to fit in RAM.
    """
    probe = code + ("\nimport resource, re; s = open('/proc/self/status').read()"
                    "\nkb = lambda k: int(re.search(k + r':\\s+(\\d+)', s).group(1))"
                    "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, kb('RssAnon'), kb('RssFile'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    peak, anon, file = (int(v) * 1024 / 1e9 for v in out.stdout.strip().splitlines()[-1].split())
    return peak, anon, file


def timed_generate(model, ids, n):
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def bare_generate(model, prompt_ids, n):
    """(time to first token, decode tokens/s) of transformers' own generate loop."""
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    first = timed_generate(model, ids, 1)
    total = timed_generate(model, ids, n)
    return first, (n - 1) / (total - first)


def engine_for(loaded, **options):
    """An engine attached to an already loaded model (each bench part a new one over the same weights)."""
    from server.engine import Engine

    engine = Engine(**options)
    engine.attach(loaded)
    return engine


def engine_generate(engine, query, n):
    from server.engine.budget import GenerationRequest

    start = time.perf_counter()
    done = engine.submit(GenerationRequest(query=query, max_new_tokens=n, temperature=0)).wait()
    assert done.completion_tokens == n, done
    total = time.perf_counter() - start
    first = done.first_token_seconds
    return first, (n - 1) / (total - first)


def median_pair(runs):
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--precisions", default="float32,bfloat16,8,4",
                        help="comma list of float32, bfloat16, float16, 8, 4")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=int, default=32, help="reply tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="reuse (or create) the checkpoint here")
    args = parser.parse_args()


    from server.model.loader import load_model

    folder = prepare_checkpoint(args.dir, args.layers, args.device)
    size = sum(f.stat().st_size for f in folder.glob("pytorch_model-*.bin")) / 1e9

    convert_code = f"from pathlib import Path; from server.model.convert import convert; convert(Path({str(folder)!r}))"
    conv_rss = peak_rss_of(convert_code)[0]
    largest = max(f.stat().st_size for f in folder.glob("pytorch_model-*.bin")) / 1e9
    print(f"peak RSS of conversion {conv_rss:.2f} GB; checkpoint {size:.2f} GB, largest shard {largest:.2f} GB")
    for precision in args.precisions.split(","):
        load_code = ("from pathlib import Path; from server.model.loader import load_model; "
                     "from bench.bench_engine import plan_for_precision; "
                     f"loaded = load_model(Path({str(folder)!r}), plan_for_precision({precision!r}, 'cpu'))")
        peak, anon, file = peak_rss_of(load_code)
        print(f"loading at {precision}: peak RSS {peak:.2f} GB; then anonymous {anon:.2f} GB + file-backed "
              f"(memory-mapped checkpoint) {file:.2f} GB")

    query = "请用三句话介绍一下北京的历史。"
    print(f"\nreply of {args.tokens} tokens, greedy, median of {args.repeats}")
    print(f"{'precision':>10} {'bare tok/s':>11} {'engine tok/s':>13} {'ratio':>6} {'bare TTFT':>10} {'engine TTFT':>12}")
    results = {}
    for precision in args.precisions.split(","):
        loaded = load_model(folder, plan_for_precision(precision, args.device))
        prompt = loaded.tokenizer.build_prompt(query, [])
        engine = engine_for(loaded)
        bare, eng = [], []
        for i in range(args.repeats + 1):  # the first run warms up and is not counted
            b, e = bare_generate(loaded.model, prompt, args.tokens), engine_generate(engine, query, args.tokens)
            if i:
                bare.append(b)
                eng.append(e)
        engine.close()
        (b_ttft, b_tps), (e_ttft, e_tps) = median_pair(bare), median_pair(eng)
        results[precision] = dict(bare_tps=b_tps, engine_tps=e_tps, bare_ttft=b_ttft, engine_ttft=e_ttft)
        print(f"{precision:>10} {b_tps:11.1f} {e_tps:13.1f} {e_tps / b_tps:6.3f} {b_ttft * 1000:8.0f}ms "
              f"{e_ttft * 1000:10.0f}ms")
        del loaded, engine
    print(json.dumps(results))


if __name__ == "__main__":
    main()

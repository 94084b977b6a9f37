"""The full-size model on the CPU: first start, memory, speed and output quality per backend, in one run.

    python bench/bench_cpu.py --dir /data/bench-full                 # writes the 12.5 GB checkpoint once
    python bench/bench_cpu.py --dir /data/bench-full --layers 4      # a quicker slice of the same shape
    python bench/bench_cpu.py --dir /data/bench-full --configs torch-4,bnb-4 --gguf Q4_0=/data/q4_0.gguf

The checkpoint is ChatGLM2-6B-shaped with random weights and the real tokenizer when ../shared has it (7 `.bin`
shards in the hub layout). Each configuration runs in a fresh process (so its memory peaks are its own): conversion
(first start), loading to ready (a later start: the converted cache exists; warm-up included), peak RSS and peak
anonymous memory (sampled every 20 ms), steady memory, time to first token of the first and of a later short
request, decode tokens/s of a 64-token greedy reply (the faster of two), and prefill tokens/s of a 1,000-token
prompt without any cache, and the first 20-token question through a new engine (the chat template's start comes
from the prefix cache, which the engine fills with it at start). Two probes run in the same process: memory read bandwidth
(a float32 sum over 2 GB) and bfloat16 matmul throughput; decode is reported against the bandwidth limit (bytes of
weights read per token / bandwidth) and prefill against the matmul throughput. Quality: mean KL divergence and
top-1 agreement of next-token distributions against the bfloat16 run on a fixed 128-token text (relative only: the
weights are random). With --gguf and llama-cpp-python installed (built from source; optional), llama.cpp
runs the same measurements on a GGUF of the same weights, with 2 threads, and the ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import REAL_TOKENIZER, SIX_B, engine_for  # noqa: E402

CONFIGS = ("dense-16", "torch-4", "torch-4-torch", "torch-4-vnni", "torch-8", "torch-8-torch", "torch-8-fbgemm",
           "torch-8-onednn", "bnb-4", "bnb-8")
QUALITY_TEXT = ("北京是中华人民共和国的首都，历史悠久，文化灿烂。The quick brown fox jumps over the lazy dog. "
                "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n") * 8


def status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(key + r":\s+(\d+)", text).group(1))


class MemoryPeaks:
    """Peak RSS (the kernel's VmHWM) and peak anonymous RSS (sampled) of this process, in GB."""

    def __init__(self):
        self.anon = 0
        self.running = True
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while self.running:
            self.anon = max(self.anon, status_kb("RssAnon"))
            time.sleep(0.02)

    def now(self) -> dict:
        return {"peak_rss_gb": status_kb("VmHWM") / 1e6, "peak_anon_gb": max(self.anon, status_kb("RssAnon")) / 1e6,
                "rss_gb": status_kb("VmRSS") / 1e6, "anon_gb": status_kb("RssAnon") / 1e6}


def bandwidth_gbs() -> float:
    import torch

    # 2 GB summed as float32: a bfloat16 sum is bound by its conversion on some CPUs (Sapphire Rapids, 2 threads:
    # 17.7 GB/s, where the same bytes as float32 read at 29 and the 8-bit model's decode at 23)
    x = torch.ones(1024**3, dtype=torch.bfloat16).view(torch.float32)
    x.sum()
    start = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - start) / 1e9


def matmul_gflops() -> float:
    import torch

    # the shape of the model's largest matmul in a 512-token prefill, as nn.Linear computes it
    x, w = torch.randn(512, 4096, dtype=torch.bfloat16), torch.randn(27392, 4096, dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    return 3 * 2 * 512 * 4096 * 27392 / (time.perf_counter() - start) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row of it is read), the
    int8 GEMMs' copies of int8 layers (one byte per weight) and the VNNI kernel's of int4 layers included."""
    from server.model.cpu_quant import Int4Linear, Int8Linear

    total = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                if "embed_tokens" not in n and "rotary" not in n)
    packed = sum(m.in_features * m.out_features if isinstance(m, Int8Linear) else m.packed.nbytes
                 for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear)) and m.packed is not None)
    return int(total + packed)


def matmul_params(config) -> int:
    """Weights one token multiplies (every linear layer and the output layer): prefill costs 2 FLOPs each."""
    h, head_dim = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return config.num_hidden_layers * layer + config.vocab_size * h


SWEEP = (1, 2, 8, 16, 20, 31, 32, 64, 128)
# Decode is timed over this many replies, llama.cpp's too, and the fastest counts: a shared host slows down for
# seconds at a time (one 64-token reply of the 8-bit model ran at 355 ms a step, the next ones at 250 on the Xeon).
DECODE_RUNS = 2


def prompt_sweep(model, tok) -> dict[int, float]:
    """ms to run a prompt of M tokens on an empty cache (the best of two), for M in SWEEP: a short prompt should
    cost no more than that many decode steps, and no M should cost a step more than the one before."""
    import torch
    from transformers import DynamicCache

    from server.model.forward import prefill

    ids = (tok.prompt_prefix() + tok.sp.encode("你好，今天天气怎么样？" * 40))[:max(SWEEP)]
    times = {}
    with torch.inference_mode():
        for m in SWEEP:
            best = float("inf")
            for _ in range(2):
                begin = time.perf_counter()
                prefill(model, ids[:m], DynamicCache(config=model.config))
                best = min(best, time.perf_counter() - begin)
            times[m] = round(best * 1000, 1)
    return times


def chat_prompt(loaded, tokens: int = 20) -> dict:
    """The first question of `tokens` prompt tokens through a new engine: what a user meets after a start, where
    the chat template's start comes from the prefix cache (the engine runs it at start; the sweep above runs it
    too)."""
    from server.engine.budget import GenerationRequest

    engine = engine_for(loaded, max_batch=1, prompt_cache_mb=256)
    words = loaded.tokenizer.sp.encode("明天北京的天气怎么样？适合带孩子去公园散步吗？请简单说说理由。" * 4)
    query = next(q for q in (loaded.tokenizer.decode(words[:n]) for n in range(1, len(words)))
                 if len(loaded.tokenizer.build_prompt(q, [])) >= tokens)
    done = engine.submit(GenerationRequest(query=query, max_new_tokens=1, temperature=0)).wait()
    engine.close()
    return {"tokens": done.prompt_tokens, "cached": done.cached_tokens, "ttft_ms": done.first_token_seconds * 1000}


def quality_ids(tokenizer) -> list[int]:
    return (tokenizer.prompt_prefix() + tokenizer.sp.encode(QUALITY_TEXT))[:128]


# -- one configuration, in its own process -----------------------------------------------------------------------
def worker(folder: Path, config: str, tokens: int, prompt_tokens: int, reference: Path) -> dict:
    import torch
    from transformers import DynamicCache

    from server.engine.sampling import Sampling, generate_ids
    from server.model.convert import ensure_converted
    from server.model.forward import prefill
    from server.model.loader import cache_format, load_model
    from server.model.profiles import Plan

    peaks = MemoryPeaks()
    backend, bits, *kernel = config.removesuffix(":convert").split("-")  # torch-8-fbgemm: a kernel forced
    kernel = (kernel or ["auto"])[0]
    plan = Plan("cpu", int(bits), "bfloat16", 8192, "bench", "bench", backend=backend,
                int8_kernel=kernel if bits == "8" else "auto", int4_kernel=kernel if bits == "4" else "auto")
    if config.endswith(":convert"):  # the first start's conversion, in a process of its own
        start = time.perf_counter()
        ensure_converted(folder, cache_format(plan))
        return {"convert_s": time.perf_counter() - start, "convert_mem": peaks.now()}
    result = {"config": config}
    start = time.perf_counter()
    loaded = load_model(folder, plan)  # the converted cache exists now: this is what a later start costs
    result["ready_s"] = time.perf_counter() - start
    result["load_mem"] = peaks.now()
    model, tok = loaded.model, loaded.tokenizer
    mask = torch.zeros(model.config.vocab_size)

    def ttft(query: str) -> float:
        ids = tok.build_prompt(query, [])
        begin = time.perf_counter()
        next(generate_ids(model, ids, 1, Sampling(temperature=0), mask))
        return time.perf_counter() - begin

    result["first_ttft_s"] = ttft("你好，请介绍一下你自己。")
    result["later_ttft_s"] = min(ttft("你好，请介绍一下你自己。") for _ in range(2))
    ids = tok.build_prompt("请写一篇关于春天的短文。", [])
    rates = []
    for _ in range(DECODE_RUNS):
        stamps = [time.perf_counter() for _ in generate_ids(model, ids, tokens, Sampling(temperature=0), mask)]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["decode_tps"] = max(rates)
    result["step_ms"] = 1000 / max(rates)
    result["prompt_ms"] = prompt_sweep(model, tok)
    result["chat_prompt"] = chat_prompt(loaded)
    result["cpu_kernels"] = loaded.cpu_kernels and {k: v for k, v in loaded.cpu_kernels.items() if k != "measured"}
    result["bytes_per_token"] = weight_bytes_per_token(model)
    result["params_per_token"] = matmul_params(model.config)
    long_ids = (tok.prompt_prefix() + tok.sp.encode("春天来了，万物复苏。" * prompt_tokens))[:prompt_tokens]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        begin = time.perf_counter()
        prefill(model, long_ids, cache)
        result["prefill_tps"] = prompt_tokens / (time.perf_counter() - begin)
        logits = model(torch.tensor([quality_ids(tok)])).logits[0].float()
    if config == "dense-16":
        torch.save(logits, reference)
    elif reference.exists():
        ref = torch.load(reference)
        log_p, log_q = ref.log_softmax(-1), logits.log_softmax(-1)
        result["kl_vs_bf16"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        result["top1_vs_bf16"] = float((ref.argmax(-1) == logits.argmax(-1)).float().mean())
    result["steady_mem"] = peaks.now()
    return result


def llama_worker(gguf: str, tokens: int, prompt_tokens: int) -> dict:
    """The same speed figures from llama.cpp (llama-cpp-python), 2 threads, no prompt cache reuse."""
    from llama_cpp import Llama

    peaks = MemoryPeaks()
    start = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)
    result = {"config": f"llama.cpp {Path(gguf).stem}", "ready_s": time.perf_counter() - start}
    prompt = llm.tokenize("请写一篇关于春天的短文。".encode())
    rates = []
    for _ in range(DECODE_RUNS):
        llm.reset()
        llm.eval(prompt)
        stamps = []
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        for _ in range(tokens):
            llm.eval([token])
            stamps.append(time.perf_counter())
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["decode_tps"] = max(rates)
    long_ids = llm.tokenize(("春天来了，万物复苏。" * prompt_tokens).encode())[:prompt_tokens]
    llm.reset()
    begin = time.perf_counter()
    llm.eval(long_ids)
    result["prefill_tps"] = len(long_ids) / (time.perf_counter() - begin)
    result["steady_mem"] = peaks.now()
    return result


def llama_bench_worker(binary: str, gguf: str, tokens: int, prompt_tokens: int) -> dict:
    """The decode and prefill figures from llama.cpp's own llama-bench (2 threads), where llama-cpp-python is
    not installed: `-n` tokens generated after an empty context (the fastest of its runs, as ours), `-p` prompt
    tokens (the mean of its runs)."""
    out = subprocess.run([binary, "-m", gguf, "-t", "2", "-p", str(prompt_tokens), "-n", str(tokens),
                          "-r", str(DECODE_RUNS), "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    prefill = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"config": f"llama.cpp {Path(gguf).stem}", "ready_s": float("nan"), "decode_tps": max(decode["samples_ts"]),
            "prefill_tps": prefill["avg_ts"], "steady_mem": {"rss_gb": float("nan")}}


# -- the report --------------------------------------------------------------------------------------------------
def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the bench checkpoint (written when missing)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--configs", default="dense-16,torch-4,torch-8,bnb-4", help=f"comma list of {CONFIGS}")
    parser.add_argument("--tokens", type=int, default=64, help="reply tokens for decode speed")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prompt tokens for prefill speed")
    parser.add_argument("--gguf", action="append", default=[], help="NAME=path of a GGUF for llama.cpp (repeatable)")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary, used for --gguf when "
                                              "llama-cpp-python is not installed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reference = args.dir / "bench-bf16-logits.pt"
    if args.worker:
        if args.worker.startswith("llama="):
            result = llama_worker(args.worker[len("llama="):], args.tokens, args.prompt_tokens)
        else:
            result = worker(args.dir, args.worker, args.tokens, args.prompt_tokens, reference)
        print("RESULT " + json.dumps(result))
        return

    import platform

    import torch

    if not (args.dir / "config.json").exists():
        from tests.checkpoint_factory import write_checkpoint

        start = time.perf_counter()
        write_checkpoint(args.dir, num_layers=args.layers, shards=7 if args.layers == 28 else 2,
                         tokenizer=REAL_TOKENIZER if REAL_TOKENIZER.exists() else None, **SIX_B)
        print(f"wrote the checkpoint in {time.perf_counter() - start:.0f} s")
    shards = sorted(args.dir.glob("pytorch_model-*.bin"))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"checkpoint: {json.loads((args.dir / 'config.json').read_text())['num_layers']} layers, "
          f"{sum(s.stat().st_size for s in shards) / 1e9:.2f} GB in {len(shards)} shards "
          f"(largest {max(s.stat().st_size for s in shards) / 1e9:.2f} GB)")
    results = []
    for config in args.configs.split(","):
        converted = run_worker(["--dir", str(args.dir), "--worker", config + ":convert"])
        bandwidth, gflops = bandwidth_gbs(), matmul_gflops()  # probes right before, in the same run
        r = run_worker(["--dir", str(args.dir), "--worker", config, "--tokens", str(args.tokens),
                        "--prompt-tokens", str(args.prompt_tokens)])
        after = bandwidth_gbs()  # and right after: a shared host's bandwidth moves by 30 % within minutes
        r.update(converted)
        r.update(bandwidth_gbs=(bandwidth + after) / 2, bandwidth_probes_gbs=[round(bandwidth, 1), round(after, 1)],
                 matmul_gflops=gflops)
        results.append(r)
        print_result(r)
    for spec in args.gguf:
        name, path = spec.split("=", 1)
        if args.llama_bench:
            r = llama_bench_worker(args.llama_bench, path, args.tokens, args.prompt_tokens)
        else:
            r = run_worker(["--dir", str(args.dir), "--worker", f"llama={path}", "--tokens", str(args.tokens),
                            "--prompt-tokens", str(args.prompt_tokens)])
        r["config"] = f"llama.cpp {name}"
        results.append(r)
        print(f"{r['config']}: ready {r['ready_s']:.1f} s, decode {r['decode_tps']:.2f} tok/s, prefill "
              f"{r['prefill_tps']:.1f} tok/s, steady RSS {r['steady_mem']['rss_gb']:.1f} GB")
    ours = {r["config"]: r for r in results if not r["config"].startswith("llama")}
    for r in results:
        if r["config"].startswith("llama"):
            for mine in ours.values():
                print(f"{mine['config']} / {r['config']}: decode {mine['decode_tps'] / r['decode_tps']:.2f}, "
                      f"prefill {mine['prefill_tps'] / r['prefill_tps']:.2f}")
    print(json.dumps(results))


def print_result(r: dict) -> None:
    limit = r["bandwidth_gbs"] * 1e9 / r["bytes_per_token"]
    prefill_gflops = r["prefill_tps"] * 2 * r["params_per_token"] / 1e9
    quality = (f", KL vs bf16 {r['kl_vs_bf16']:.4f}, top-1 agreement {r['top1_vs_bf16']:.3f}"
               if "kl_vs_bf16" in r else "")
    print(f"{r['config']}: convert {r['convert_s']:.0f} s (peak RSS {r['convert_mem']['peak_rss_gb']:.1f} GB, "
          f"anon {r['convert_mem']['peak_anon_gb']:.1f}); ready after {r['ready_s']:.1f} s (peak RSS "
          f"{r['load_mem']['peak_rss_gb']:.1f} GB, anon {r['load_mem']['peak_anon_gb']:.1f}); steady RSS "
          f"{r['steady_mem']['rss_gb']:.1f} GB, anon {r['steady_mem']['anon_gb']:.1f}\n"
          f"    TTFT first {r['first_ttft_s']:.2f} s, later {r['later_ttft_s']:.2f} s; decode "
          f"{r['decode_tps']:.2f} tok/s = {r['decode_tps'] / limit:.2f} of the bandwidth limit ({limit:.1f} tok/s "
          f"at {r['bandwidth_gbs']:.1f} GB/s, the mean of {r.get('bandwidth_probes_gbs')} before and after; "
          f"{r['bytes_per_token'] / 1e9:.2f} GB/token); prefill "
          f"{r['prefill_tps']:.1f} tok/s = {prefill_gflops:.0f} GFLOPS = {prefill_gflops / r['matmul_gflops']:.2f} "
          f"of the bf16 matmul's {r['matmul_gflops']:.0f}{quality}\n"
          f"    kernels {r['cpu_kernels']}; decode step {r['step_ms']:.0f} ms; a prompt of M tokens (ms): "
          f"{r['prompt_ms']}\n"
          f"    the first {r['chat_prompt']['tokens']}-token question after a start (the engine): "
          f"{r['chat_prompt']['cached']} tokens from the prefix cache, TTFT {r['chat_prompt']['ttft_ms']:.0f} ms "
          f"= {r['chat_prompt']['ttft_ms'] / r['step_ms']:.1f} decode steps", flush=True)


if __name__ == "__main__":
    main()

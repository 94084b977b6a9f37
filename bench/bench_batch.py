"""The prefix cache and continuous batching on the full-size model, through the engine, in one run.

    python bench/bench_batch.py --dir /data/bench-full                    # 8-bit, the CPU default where it fits
    python bench/bench_batch.py --dir /data/bench-full --config torch-4   # another backend
    python bench/bench_batch.py --dir /data/bench-full --layers 4         # a quick slice of the same shape
    python bench/bench_batch.py --dir /data/bench-full --config cuda-8    # a GPU profile (cuda-16/-8/-4)

The checkpoint is bench_cpu.py's (written when missing). Three measurements:
1. Multi-turn chat: a 6-turn greedy chat, ~250 tokens added per round (a ~200-token question and a 48-token
   reply, sent back as history the way a client does), run with the prefix cache and again without it; time to
   first token per turn and the tokens taken from the cache. The weights are random, so a reply's tokens are
   often split otherwise when its text is encoded again: only the common prefix is reused (a trained model's
   replies re-encode to the same ids; tests/test_prefix_cache.py checks that with the real tokenizer).
2. Concurrent streams: 1, 2, 4 and 8 short prompts submitted at once (max batch 8), 32 reply tokens each;
   aggregate tokens/s over the time all decode, and each stream's own tokens/s, against one stream alone.
3. A job arriving while 3 others decode: its time to first token against its own prefill time alone plus the
   decode step time of the batch.
4. Chunked prefill (`gap`): a 2,000-token prompt joins 3 decoding streams; the longest, the 90th percentile and
   the median pause between two tokens of a running stream against its normal step and the prompt's last chunk
   alone (over a cache of the rest, where a chunk costs most), how many pauses exceed two steps and that chunk,
   with the prompt in chunks (on the CPU inside the decode step, the default, and apart from it), on the CPU
   layer by layer where its rows expand the weights (the default there; the chunk: one layer pass alone, the
   slowest) and in one piece, and the throughput.
5. Features (`features`): one stream's decode tok/s plain, under a JSON schema (the grammar's mask each token)
   and with logprobs (top 5), against the plain figure.
6. Restart (`restart`, not run by default): the next turn of a 4,000-token conversation after a restart (the
   prefix cache's disk tier only) against a warm continuation (its memory tier).
On a GPU the peak memory of each part is printed (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import REAL_TOKENIZER, SIX_B, engine_for  # noqa: E402

GREEDY = dict(temperature=0.0)
QUESTION = ("请根据下面的材料回答问题，并给出理由。材料：北京是中华人民共和国的首都，历史悠久，文化灿烂，"
            "拥有故宫、长城、天坛等名胜古迹。The quick brown fox jumps over the lazy dog while the "
            "committee reviews the quarterly report and the engineers measure the latency of every request. ")


def question(turn: int, tokenizer, tokens: int = 200) -> str:
    """A question of about `tokens` tokens, different per turn."""
    text = f"第{turn + 1}轮 round {turn + 1}: " + QUESTION * (tokens // 20)
    return tokenizer.decode(tokenizer.sp.encode(text)[:tokens])


def load(folder: Path, config: str):
    from server.model.loader import load_model
    from server.model.profiles import Plan

    backend, bits = config.split("-")
    if backend == "cuda":  # the GPU profiles: float16, bitsandbytes 8-bit or NF4
        plan = Plan("cuda", int(bits), "float16", 8192, "bench", "bench")
    else:
        plan = Plan("cpu", int(bits), "bfloat16", 8192, "bench", "bench", backend=backend)
    start = time.perf_counter()
    loaded = load_model(folder, plan)
    print(f"loaded {config} in {time.perf_counter() - start:.1f} s")
    return loaded


def multi_turn(loaded, turns: int, reply: int, cache: bool) -> list[tuple[int, int, float]]:
    """(prompt tokens, cached tokens, time to first token) per turn."""
    from server.engine.budget import GenerationRequest

    engine = engine_for(loaded, max_batch=1, prompt_cache_mb=1024 if cache else 0)
    history, rows = [], []
    for turn in range(turns):
        q = question(turn, loaded.tokenizer)
        done = engine.submit(GenerationRequest(query=q, history=list(history), max_new_tokens=reply,
                                               **GREEDY)).wait()
        history.append((q, done.text))
        rows.append((done.prompt_tokens, done.cached_tokens, done.first_token_seconds))
        print(f"  turn {turn + 1} {'cache' if cache else 'no cache'}: prompt {done.prompt_tokens}, "
              f"cached {done.cached_tokens}, TTFT {done.first_token_seconds:.2f} s", flush=True)
    engine.close()
    return rows


def streams(loaded, n: int, reply: int) -> tuple[float, float]:
    """(aggregate tok/s, median per-stream tok/s) of n streams submitted at once, counted from the moment the
    last of them has its first token (the prompts run one after another before the batch decodes)."""
    from server.engine.budget import GenerationRequest

    engine = engine_for(loaded, max_batch=8, prompt_cache_mb=0)
    jobs = [engine.submit(GenerationRequest(query=f"第{i}个问题：请介绍一下你自己。", max_new_tokens=reply, **GREEDY))
            for i in range(n)]
    done = [job.wait() for job in jobs]
    engine.close()
    decoding = max(job.submitted + f.first_token_seconds for job, f in zip(jobs, done))
    ends = [job.submitted + f.seconds for job, f in zip(jobs, done)]
    per_stream = [(f.completion_tokens - 1) / (end - decoding) for f, end in zip(done, ends)]
    aggregate = sum(f.completion_tokens - 1 for f in done) / (max(ends) - decoding)
    return aggregate, statistics.median(per_stream)


def arriving(loaded, reply: int) -> tuple[float, float, float]:
    """(TTFT of a job joining 3 decoding ones, its prefill alone, the 4-row decode step time)."""
    from server.engine.budget import GenerationRequest

    late = GenerationRequest(query=question(9, loaded.tokenizer, tokens=100), max_new_tokens=4, **GREEDY)
    alone = engine_for(loaded, max_batch=1, prompt_cache_mb=0)
    prefill = alone.submit(late).wait().first_token_seconds
    alone.close()
    engine = engine_for(loaded, max_batch=4, prompt_cache_mb=0)
    others = [engine.submit(GenerationRequest(query=f"other {i}", max_new_tokens=reply, **GREEDY)) for i in range(3)]
    for job in others:
        job.next_event()
    stamps = []
    for _ in range(4):  # time a few steps of the three (an update can carry several tokens: count them)
        stamps.append((time.perf_counter(), others[0].next_event().completion_tokens))
    job = engine.submit(late)
    ttft = job.wait().first_token_seconds
    step = (stamps[-1][0] - stamps[0][0]) / (stamps[-1][1] - stamps[0][1])
    for other in others:
        other.cancel()
    engine.close()
    return ttft, prefill, step


def gap(loaded, chunk: int, prompt_tokens: int, **options) -> dict:
    """The longest pause between two tokens of a decoding stream while a long prompt joins 3 of them, and the
    time one chunk of that prompt takes alone (by layers: one layer pass over its first piece, the first and the
    slowest). `options`: the engine's (mixed_steps, layered_from)."""
    from server.engine.budget import GenerationRequest

    long_query = question(7, loaded.tokenizer, tokens=prompt_tokens)
    ids = loaded.tokenizer.build_prompt(long_query, [])
    engine = engine_for(loaded, max_batch=4, prompt_cache_mb=0, prefill_chunk=chunk, **options)
    if min(len(ids), engine.layered_piece) >= engine.layered_from:  # (as the engine decides)
        chunk_alone, last_chunk = layer_pass_seconds(loaded, ids, engine.layered_piece)
    else:
        alone = engine_for(loaded, max_batch=1, prompt_cache_mb=0)
        piece = GenerationRequest(query=question(8, loaded.tokenizer, tokens=min(chunk, prompt_tokens)),
                                  max_new_tokens=1, **GREEDY)
        chunk_alone = min(alone.submit(piece).wait().first_token_seconds for _ in range(2))
        alone.close()
        last_chunk = last_chunk_seconds(loaded, ids, chunk)
    others = [engine.submit(GenerationRequest(query=f"other {i}", max_new_tokens=100000, **GREEDY)) for i in range(3)]
    for job in others:
        job.next_event()
    stamps = []  # (time, tokens so far) at each update of the first stream

    def watch(count):
        for _ in range(count):
            stamps.append((time.perf_counter(), others[0].next_event().completion_tokens))

    watch(8)  # updates coalesce while nobody reads: the first ones come at once, with several tokens
    step = (stamps[-1][0] - stamps[3][0]) / (stamps[-1][1] - stamps[3][1])  # per token, after the backlog
    before = len(stamps)
    submitted = time.perf_counter()
    long_job = engine.submit(GenerationRequest(query=long_query, max_new_tokens=8, **GREEDY))
    while long_job.result is None:
        watch(1)
    watch(3)
    pauses = [b[0] - a[0] for a, b in zip(stamps[before - 1:], stamps[before:])]  # what a reader sees
    tokens = stamps[-1][1] - stamps[before - 1][1]
    for job in others:
        job.cancel()
    engine.close()
    first_token = submitted + long_job.result.first_token_seconds
    prompt_pauses = sum(1 for t, _ in stamps[before:] if t <= first_token)  # those while the prompt ran
    top = sorted(range(len(pauses)), key=pauses.__getitem__)[-3:][::-1]  # the three longest, longest first
    return {"chunk": chunk, "step": step, "longest": pauses[top[0]], "ttft": long_job.result.first_token_seconds,
            "pauses": pauses, "median pause": statistics.median(pauses),
            "longest at": (f"{top[0] + 1}/{len(pauses)}, the prompt's first token at {prompt_pauses}; "
                           "next: " + ", ".join(f"{pauses[i] * 1000:.0f} ms at {i + 1}" for i in top[1:])),
            "chunk alone": chunk_alone, "last chunk": last_chunk,
            "stream tok/s during": tokens / (stamps[-1][0] - stamps[before - 1][0])}


def layer_pass_seconds(loaded, ids: list[int], piece_tokens: int) -> tuple[float, float]:
    """A prompt's first piece run layer by layer alone (engine/layered_prefill.py): its first layer pass and its
    slowest."""
    import torch
    from transformers import DynamicCache

    from server.engine.layered_prefill import LayeredPiece

    times = []
    with torch.inference_mode():
        piece = LayeredPiece(loaded.model, ids[:piece_tokens], DynamicCache(config=loaded.model.config))
        logits = None
        while logits is None:
            start = time.perf_counter()
            logits = piece.run_layer()
            times.append(time.perf_counter() - start)
    return times[0], max(times)


def last_chunk_seconds(loaded, ids: list[int], chunk: int) -> float:
    """The prompt's last chunk alone, over a cache of the rest of it: where a chunk costs the most (its rows
    attend to the whole prompt). 0 when the prompt is one chunk."""
    import torch
    from transformers import DynamicCache

    from server.model.forward import prefill

    if chunk >= len(ids):
        return 0.0
    cache = DynamicCache(config=loaded.model.config)
    times = []
    with torch.inference_mode():
        prefill(loaded.model, ids[:-chunk], cache)
        for _ in range(2):
            start = time.perf_counter()
            prefill(loaded.model, ids[-chunk:], cache)
            times.append(time.perf_counter() - start)
            cache.crop(-chunk)  # (removes the chunk again)
    return min(times)


def restart(loaded, context_tokens: int, reply: int) -> dict:
    """The next turn of a `context_tokens`-token conversation: its TTFT after a restart (a new engine, its memory
    tier empty, its disk tier holding the first turn) against a warm continuation (another next turn on the same
    engine: the memory tier holds the conversation) and against no cache at all (the first turn's own TTFT)."""
    import shutil
    import tempfile

    from server.engine.budget import GenerationRequest

    with tempfile.TemporaryDirectory() as folder:
        here = dataclasses.replace(loaded, path=Path(folder))  # the disk tier lives in the model folder,
        shutil.copy(loaded.path / "config.json", folder)  # named after its files (config.json among them)
        first_turn = GenerationRequest(query=question(0, loaded.tokenizer, tokens=context_tokens),
                                       max_new_tokens=reply, **GREEDY)
        engine = engine_for(here, max_batch=1, prompt_cache_mb=1024, prompt_cache_disk_mb=2048)
        first = engine.submit(first_turn).wait()
        engine.prefix_cache.disk.flush()
        engine.close()
        history = [(first_turn.query, first.text)]

        def next_turn(engine, n: int):
            return engine.submit(GenerationRequest(query=question(n, loaded.tokenizer, tokens=20),
                                                   history=list(history), max_new_tokens=1, **GREEDY)).wait()

        restarted = engine_for(here, max_batch=1, prompt_cache_mb=1024, prompt_cache_disk_mb=2048)
        after = next_turn(restarted, 1)
        warm = next_turn(restarted, 2)
        restarted.prefix_cache.disk.flush()
        restarted.close()
    return {"prompt": after.prompt_tokens, "cold": first.first_token_seconds,
            "restart": after.first_token_seconds, "restart cached": after.cached_tokens,
            "warm": warm.first_token_seconds, "warm cached": warm.cached_tokens}


def features(loaded, reply: int) -> dict:
    """One stream's decode tok/s: plain, under a JSON schema, with logprobs (top 5)."""
    from server.engine.budget import GenerationRequest
    from server.engine.grammar import json_schema_grammar

    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}}}
    variants = {"plain": {}, "json schema": {"grammar": json_schema_grammar(schema)}, "logprobs 5": {"logprobs": 5}}
    engine = engine_for(loaded, max_batch=4, prompt_cache_mb=0)
    rates = {}
    for name, extra in variants.items():
        runs = []
        for _ in range(2):
            done = engine.submit(GenerationRequest(query="列出一些东西", max_new_tokens=reply, **GREEDY, **extra)).wait()
            runs.append((done.completion_tokens - 1) / (done.seconds - done.first_token_seconds))
        rates[name] = max(runs)
    engine.close()
    return rates


def peak_gib() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    peak = torch.cuda.max_memory_allocated() / 1024**3
    torch.cuda.reset_peak_memory_stats()
    return f" [GPU peak {peak:.2f} GiB]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the bench checkpoint (written when missing)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--config", default="torch-8", help="torch-8 (the CPU default where it fits), torch-4, "
                                                             "bnb-4, dense-16, cuda-16/-8/-4")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--reply", type=int, default=48, help="reply tokens per chat turn")
    parser.add_argument("--stream-tokens", type=int, default=32)
    parser.add_argument("--parts", default="chat,streams,arriving,gap,features")
    parser.add_argument("--gap-tokens", type=int, default=2000, help="the long prompt of part 4")
    parser.add_argument("--restart-tokens", type=int, default=4000, help="the conversation of part 6")
    args = parser.parse_args()

    import torch

    if not (args.dir / "config.json").exists():
        from tests.checkpoint_factory import write_checkpoint

        write_checkpoint(args.dir, num_layers=args.layers, shards=7 if args.layers == 28 else 2,
                         tokenizer=REAL_TOKENIZER if REAL_TOKENIZER.exists() else None, **SIX_B)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config}")
    loaded = load(args.dir, args.config)
    if torch.cuda.is_available():
        print(f"GPU {torch.cuda.get_device_name()}: model {torch.cuda.memory_allocated() / 1024**3:.2f} GiB "
              f"allocated after load{peak_gib()}")
    parts = args.parts.split(",")

    if "chat" in parts:
        print(f"\n1. {args.turns}-turn chat, ~250 tokens a round:")
        cached = multi_turn(loaded, args.turns, args.reply, cache=True)
        plain = multi_turn(loaded, args.turns, args.reply, cache=False)
        print("| turn | prompt tokens | cached | TTFT with cache | TTFT without | with ÷ turn 1 | without ÷ turn 1 |")
        print("|---|---|---|---|---|---|---|")
        for i, ((p, c, t), (_, _, u)) in enumerate(zip(cached, plain), start=1):
            print(f"| {i} | {p} | {c} | {t:.2f} s | {u:.2f} s | {t / cached[0][2]:.2f} | {u / plain[0][2]:.2f} |")
        print(peak_gib())

    if "streams" in parts:
        print(f"\n2. concurrent streams, {args.stream_tokens} reply tokens each:")
        rows = [(n, *streams(loaded, n, args.stream_tokens)) for n in (1, 2, 4, 8)]
        single = rows[0][1]
        print("| streams | aggregate tok/s | ÷ one stream | per-stream tok/s | ÷ a lone stream |")
        print("|---|---|---|---|---|")
        for n, aggregate, per_stream in rows:
            print(f"| {n} | {aggregate:.2f} | {aggregate / single:.2f} | {per_stream:.2f} | "
                  f"{per_stream / rows[0][2]:.2f} |")
        print(peak_gib())

    if "arriving" in parts:
        ttft, prefill, step = arriving(loaded, reply=200)
        print(f"\n3. a job arriving while 3 decode: TTFT {ttft:.2f} s; its prefill alone {prefill:.2f} s, "
              f"4-row step {step:.2f} s; limit prefill + 2 steps = {prefill + 2 * step:.2f} s "
              f"(TTFT ÷ limit {ttft / (prefill + 2 * step):.2f}){peak_gib()}")

    if "gap" in parts:
        from server.engine.sizing import DEFAULT_PREFILL_CHUNK

        print(f"\n4. a {args.gap_tokens}-token prompt joins 3 decoding streams:")
        print("| prefill chunk | normal step | longest pause (which of all) | median pause | first chunk alone "
              "| last chunk alone | longest ÷ (2 steps + last chunk) | pauses over that bound | 90th percentile "
              "pause ÷ bound | prompt TTFT | stream tok/s meanwhile |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        chunk = DEFAULT_PREFILL_CHUNK.get(loaded.device.type, 512)
        variants = [(chunk, {}, f"{chunk}"), (args.gap_tokens, {}, "whole prompt")]
        if loaded.device.type == "cpu":  # chunks inside the decode step and apart from it
            tokens = {"layered_from": 0}
            variants[1:1] = [(chunk, {**tokens, "mixed_steps": False}, f"{chunk}, apart from the step")]
            probe = engine_for(loaded, prefill_chunk=chunk)  # (what the engine chooses for this model here)
            probe.close()
            if min(args.gap_tokens, probe.layered_piece) >= probe.layered_from:  # the default there: by layers
                variants[:1] = [(chunk, {}, "layer by layer"), (chunk, tokens, f"{chunk}, inside the step")]
        for size, options, name in variants:
            r = gap(loaded, size, args.gap_tokens, **options)
            limit = 2 * r["step"] + (r["last chunk"] or r["chunk alone"])  # the whole prompt: one chunk
            # a shared host slows down for seconds at a time: how many pauses, not only the longest, exceed it
            over = sum(1 for pause in r["pauses"] if pause > limit)
            p90 = statistics.quantiles(r["pauses"], n=10)[-1]
            print(f"| {name} | {r['step'] * 1000:.0f} ms | "
                  f"{r['longest'] * 1000:.0f} ms ({r['longest at']}) | {r['median pause'] * 1000:.0f} ms | "
                  f"{r['chunk alone'] * 1000:.0f} ms | "
                  f"{r['last chunk'] * 1000:.0f} ms | {r['longest'] / limit:.2f} | {over} of {len(r['pauses'])} | "
                  f"{p90 / limit:.2f} | "
                  f"{r['ttft']:.2f} s | {r['stream tok/s during']:.2f} |")
        print(peak_gib())

    if "restart" in parts:
        r = restart(loaded, args.restart_tokens, args.reply)
        print(f"\n6. the next turn of a {r['prompt']}-token conversation: after a restart TTFT {r['restart']:.2f} s "
              f"({r['restart cached']} tokens from the disk tier), warm {r['warm']:.2f} s ({r['warm cached']} from "
              f"memory): restart ÷ warm {r['restart'] / r['warm']:.2f}; the first turn without a cache "
              f"{r['cold']:.2f} s")

    if "features" in parts:
        rates = features(loaded, reply=args.stream_tokens * 2)
        print("\n5. one stream, decode tok/s: " + ", ".join(
            f"{name} {rate:.2f} ({rate / rates['plain']:.2f}×)" for name, rate in rates.items()) + peak_gib())


if __name__ == "__main__":
    main()

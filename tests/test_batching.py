"""Continuous batching on the tiny model: jobs decode together, join and leave between steps, and each job's
tokens are exactly those it gets alone."""

import dataclasses
import sys
import threading
import time

import pytest
import requests
import torch

from server.engine import sizing as sizing
from server.engine.budget import GenerationRequest
from server.engine.engine import Engine
from server.model.loader import load_model
from tests.conftest import cpu_plan
from tests.test_http import parse_sse

GREEDY = dict(temperature=0.0)
# four prompts of different lengths and replies of different lengths: rows join padded and leave at other steps
JOBS = [("hi", 30), ("hello world, how are you today? " * 3, 12), ("写一首关于春天的诗", 40),
        ("a b c d e f g h i j k l m n o p", 25)]


def alone_and_together(engine_for, loaded, jobs=JOBS, **request):
    """Each job's reply alone (one at a time, no prefix cache), and the replies of all submitted at once. Their
    prompts run whole beside the others too, as alone: where a prompt is split changes its attention's
    roundings on some CPUs (an AMX Xeon's), which is not what batching must keep (the decoding rows)."""
    one = engine_for(loaded, max_batch=1, prompt_cache_mb=0)
    alone = [one.submit(GenerationRequest(query=q, max_new_tokens=n, **GREEDY, **request)).wait() for q, n in jobs]
    many = engine_for(loaded, max_batch=len(jobs), prompt_cache_mb=0, prefill_chunk=sizing.PROMPT_PIECE)
    submitted = [many.submit(GenerationRequest(query=q, max_new_tokens=n, **GREEDY, **request)) for q, n in jobs]
    return alone, [job.wait() for job in submitted]


def loaded_at(tiny_checkpoint, tiny_model, precision):
    """The tiny model at `precision`, its quantized layers on their kernels at every row count: where the
    start-up timing picks torch's int8 kernel it may expand the weights for prompts from 32 rows (which rounds
    otherwise), so a prompt run whole alone and in chunks beside others would take two paths by chance."""
    from server.model.cpu_quant import QuantizedLinear

    if precision == "float32":
        return tiny_model
    bits, backend = {"bfloat16": (16, ""), "bnb-4bit": (4, "bnb"), "torch-int4": (4, "torch"),
                     "torch-int8": (8, "torch")}[precision]
    plan = cpu_plan(bits=bits, dtype="bfloat16")
    loaded = load_model(tiny_checkpoint, dataclasses.replace(plan, backend=backend) if backend else plan)
    for layer in loaded.model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.dense_from_tokens = sys.maxsize
    return loaded


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "bnb-4bit", "torch-int4", "torch-int8"])
def test_four_jobs_at_once_give_each_its_tokens_alone(engine_for, tiny_checkpoint, tiny_model, precision,
                                                      monkeypatch):
    loaded = loaded_at(tiny_checkpoint, tiny_model, precision)
    widths = []  # rows per forward pass: proves they really ran together
    forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward",
                        lambda *a, **k: (widths.append(k["input_ids"].shape[0]), forward(*a, **k))[1])
    alone, together = alone_and_together(engine_for, loaded)
    assert max(widths) == 4
    assert [f.text for f in together] == [f.text for f in alone]
    assert [f.completion_tokens for f in together] == [n for _, n in JOBS]


def test_llm_int8_rows_depend_on_their_batch_mates_through_outlier_columns(tiny_checkpoint):
    """bitsandbytes' 8-bit matmul (LLM.int8) computes the input columns holding an outlier (|x| > 6) in 16-bit,
    choosing them over the whole batch: a row's result depends on the other rows by design, so 8-bit replies
    decoded together are not bit-identical to replies alone (README). Without outliers the rows are independent."""
    loaded = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=8, dtype="bfloat16"), backend="bnb"))
    layer = loaded.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Linear8bitLt"
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, layer.in_features, generator=generator).to(torch.bfloat16)  # |x| < 1: no outliers
    with torch.inference_mode():
        rows_alone = torch.cat([layer(x[i:i + 1]) for i in range(4)])
        assert torch.equal(layer(x), rows_alone)
        x[3, 0, 5] = 20.0  # an outlier in the last row only
        rows_alone = torch.cat([layer(x[i:i + 1]) for i in range(4)])
        assert not torch.equal(layer(x)[0], rows_alone[0])  # the first row changed because of the last


def test_a_job_joins_a_running_batch_and_leaves_it_undisturbed(engine_for, slow_model):
    long_request = GenerationRequest(query="a long reply", max_new_tokens=60, **GREEDY)
    short_request = GenerationRequest(query="and a short one, asked later", max_new_tokens=8, **GREEDY)
    one = engine_for(slow_model, max_batch=1, prompt_cache_mb=0)
    expected_long, expected_short = one.submit(long_request).wait().text, one.submit(short_request).wait().text
    engine = engine_for(slow_model, max_batch=4, prompt_cache_mb=0)
    long_job = engine.submit(long_request)
    for _ in range(10):  # let it decode a few tokens alone first
        long_job.next_event(timeout=30)
    short_job = engine.submit(short_request)
    short = short_job.wait(timeout=60)
    assert long_job.result is None  # the short job joined, finished and left while the long one went on
    assert short.text == expected_short
    assert long_job.wait(timeout=60).text == expected_long
    assert short.first_token_seconds < 2  # it did not wait for the long job


def test_interrupting_one_row_leaves_the_others_exact(engine_for, slow_model):
    requests_ = [GenerationRequest(query=q, max_new_tokens=40, **GREEDY) for q in ("one", "two two", "three 3 3")]
    one = engine_for(slow_model, max_batch=1, prompt_cache_mb=0)
    expected = [one.submit(r).wait().text for r in requests_]
    engine = engine_for(slow_model, max_batch=3, prompt_cache_mb=0)
    jobs = [engine.submit(r) for r in requests_]
    deadline = time.time() + 10
    while len(engine.running_ids) < 3 and time.time() < deadline:
        time.sleep(0.005)
    assert len(engine.running_ids) == 3
    jobs[1].next_event(timeout=30)
    assert engine.interrupt(jobs[1].id) is True
    stopped = jobs[1].wait(timeout=30)
    assert stopped.finish_reason == "interrupted" and stopped.completion_tokens < 40
    assert [jobs[0].wait(timeout=60).text, jobs[2].wait(timeout=60).text] == [expected[0], expected[2]]


def test_interrupt_without_an_id_stops_every_running_job(engine_for, slow_model):
    engine = engine_for(slow_model, max_batch=2)
    jobs = [engine.submit(GenerationRequest(query=q, max_new_tokens=100, **GREEDY)) for q in ("x", "y")]
    deadline = time.time() + 10
    while len(engine.running_ids) < 2 and time.time() < deadline:
        time.sleep(0.005)
    assert engine.interrupt() is True
    assert [job.wait(timeout=30).finish_reason for job in jobs] == ["interrupted", "interrupted"]
    assert engine.running_ids == [] and engine.interrupt() is False


def test_max_batch_bounds_the_batch_and_the_rest_waits_in_order(engine_for, slow_model):
    engine = engine_for(slow_model, max_batch=2)
    jobs = [engine.submit(GenerationRequest(query=f"q{i}", max_new_tokens=20, **GREEDY)) for i in range(3)]
    deadline = time.time() + 10
    while len(engine.running_ids) < 2 and time.time() < deadline:
        time.sleep(0.005)
    assert engine.running_ids == [jobs[0].id, jobs[1].id] and engine.queue_length == 1
    third = jobs[2].wait(timeout=60)
    assert third.finish_reason == "length"
    assert third.first_token_seconds > jobs[0].result.seconds * 0.9  # it started when a row was free


def test_a_failing_step_fails_its_batch_and_the_engine_goes_on(engine_for, tiny_model, monkeypatch):
    engine = engine_for(tiny_model, max_batch=2, prompt_cache_mb=0)
    forward = tiny_model.model.forward

    def out_of_memory_in_a_batched_step(*args, **kwargs):
        if kwargs["input_ids"].shape[0] == 2:  # a GPU running out of memory (no GPU here to do it for real)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model.model, "forward", out_of_memory_in_a_batched_step)
    jobs = [engine.submit(GenerationRequest(query=q, max_new_tokens=10, **GREEDY)) for q in ("a", "b")]
    failed = [job.wait(timeout=30) for job in jobs]
    assert all(f.finish_reason == "error" and "out of memory" in f.error for f in failed)
    assert all(f.completion_tokens >= 1 for f in failed)  # each kept its first token
    ok = engine.submit(GenerationRequest(query="c", max_new_tokens=10, **GREEDY)).wait(timeout=30)
    assert ok.finish_reason == "length" and ok.completion_tokens == 10


def test_the_batch_is_capped_by_the_memory_a_full_context_row_needs(tiny_model, monkeypatch):
    per_row = sizing.kv_bytes_per_token(tiny_model) * tiny_model.plan.max_context
    config = tiny_model.model.config
    assert sizing.kv_bytes_per_token(tiny_model) == 2 * config.num_hidden_layers * \
        config.num_key_value_heads * config.head_dim * 4  # float32
    reserve = sizing.RESERVE_BYTES["cpu"]
    monkeypatch.setattr(sizing, "free_memory", lambda device: reserve + 3 * per_row)
    assert sizing.batch_size(tiny_model, 0) == 3  # the CPU's default of 4 does not fit
    assert sizing.batch_size(tiny_model, 2) == 2
    assert sizing.batch_size(tiny_model, 0, prefix_cache_bytes=per_row) == 2  # the cache shares the RAM
    monkeypatch.setattr(sizing, "free_memory", lambda device: reserve)
    assert sizing.batch_size(tiny_model, 8) == 1  # one row always runs, as before batching


def test_concurrent_http_streams_decode_together(serve, engine_for, tiny_model, monkeypatch):
    engine = engine_for(tiny_model, max_batch=4)
    queries = [f"问题{i}" * (i + 1) for i in range(4)]
    expected = [engine.submit(GenerationRequest(query=q, max_length=60, **GREEDY)).wait().text for q in queries]
    widths = []
    gate = threading.Event()  # holds the model until all four requests are in
    forward = tiny_model.model.forward

    def counted(*args, **kwargs):
        gate.wait(10)
        widths.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model.model, "forward", counted)
    server = serve(engine)
    results = {}

    def run(i):
        r = requests.post(server.url + "/stream", json={"query": queries[i], "max_length": 60, "temperature": 0},
                          timeout=60)
        results[i] = parse_sse(r.content)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while len(engine.running_ids) + engine.queue_length < 4 and time.time() < deadline:
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert max(widths) == 4
    assert [results[i][-2][1][0] for i in range(4)] == expected
    assert all(results[i][-1][1]["finish_reason"] == "length" for i in range(4))


@pytest.mark.parametrize("mixed", [True, False], ids=["in the decode step", "apart (as on a GPU)"])
def test_a_long_prompt_runs_in_chunks_between_the_decode_steps_of_others(engine_for, slow_model, monkeypatch,
                                                                         mixed):
    """Chunked prefill: while a long prompt runs, a streaming reply keeps getting tokens, one chunk at most
    between two of its steps; on the CPU each chunk runs in the same forward pass as the reply's step (the
    weights read once for both, engine/mixed_step.py), the pass `prefill_chunk` rows in all. The long prompt's
    reply is the one it gets alone."""
    long_prompt = GenerationRequest(query="hello world 你好 " * 30, max_new_tokens=6, **GREEDY)
    reply = GenerationRequest(query="hi", max_new_tokens=60, **GREEDY)
    alone = engine_for(slow_model, max_batch=1, prompt_cache_mb=0).submit(long_prompt).wait(timeout=60)
    assert alone.prompt_tokens > 100
    embed = slow_model.model.model.embed_tokens
    forward = embed.forward
    passes = []  # (rows, tokens per row) of each forward pass, in order

    def logged(input_ids):
        passes.append(tuple(input_ids.shape))
        return forward(input_ids)

    monkeypatch.setattr(embed, "forward", logged)
    engine = engine_for(slow_model, max_batch=4, prompt_cache_mb=0, prefill_chunk=16, mixed_steps=mixed)
    assert engine_for(slow_model).mixed_rows == 0  # (by default not for this model: its layers are dense)
    streaming = engine.submit(reply)
    for _ in range(3):
        streaming.next_event(timeout=30)
    before = len(passes)
    joined = engine.submit(long_prompt).wait(timeout=120)
    assert joined.text == alone.text and joined.finish_reason == "length"
    assert streaming.result is None  # it kept decoding all along
    during = passes[before:]
    if mixed:  # the reply's next token and 15 prompt tokens in each pass (the rest of it in the last), no pass
        # for the reply alone meanwhile
        with_prompt = [tokens for rows, tokens in during if tokens > 1]
        assert len(with_prompt) >= alone.prompt_tokens // 16 and with_prompt.count(16) >= len(with_prompt) - 1
        prompt_ran = [i for i, (_, tokens) in enumerate(during) if tokens > 1]
        assert all(tokens > 1 for _, tokens in during[prompt_ran[0]:prompt_ran[-1]])
    else:
        chunks = [tokens for rows, tokens in during if tokens > 1]
        assert len(chunks) >= alone.prompt_tokens // 16 and max(chunks) <= 16  # the prompt, 16 tokens at a time
        # never two chunks in a row: the streaming reply's step comes between them
        assert all(not (a[1] > 1 and b[1] > 1) for a, b in zip(during, during[1:]))
    assert streaming.wait(timeout=60).completion_tokens == reply.max_new_tokens


def test_a_job_interrupted_while_its_prompt_runs_ends_as_interrupted(engine_for, slow_model):
    engine = engine_for(slow_model, max_batch=4, prompt_cache_mb=0, prefill_chunk=4)
    streaming = engine.submit(GenerationRequest(query="hi", max_new_tokens=200, **GREEDY))
    streaming.next_event(timeout=30)
    long_job = engine.submit(GenerationRequest(query="hello world 你好 " * 30, max_new_tokens=5, **GREEDY))
    time.sleep(0.1)  # a few of its chunks have run
    assert long_job.id in engine.running_ids and long_job.result is None
    engine.interrupt(long_job.id)
    done = long_job.wait(timeout=30)
    assert done.finish_reason == "interrupted" and done.completion_tokens == 0
    assert streaming.result is None  # untouched
    engine.interrupt(streaming.id)
    assert streaming.wait(timeout=30).finish_reason == "interrupted"


def test_choices_sharing_a_prompt_go_on_when_the_first_is_interrupted(engine_for, slow_model):
    """n choices share one prefill; interrupting the one whose prompt runs hands the prompt to the next."""
    engine = engine_for(slow_model, max_batch=5, prompt_cache_mb=0, prefill_chunk=4)
    streaming = engine.submit(GenerationRequest(query="hi", max_new_tokens=200, **GREEDY))
    streaming.next_event(timeout=30)
    shared = GenerationRequest(query="hello world 你好 " * 30, max_new_tokens=5, **GREEDY)
    jobs = engine.submit_all([shared, shared, shared])
    time.sleep(0.1)  # a few chunks of the shared prompt have run
    assert all(job.result is None for job in jobs)
    engine.interrupt(jobs[0].id)
    assert jobs[0].wait(timeout=30).finish_reason == "interrupted"
    rest = [job.wait(timeout=60) for job in jobs[1:]]
    engine.interrupt(streaming.id)
    alone = engine.submit(shared).wait(timeout=60)
    assert [r.text for r in rest] == [alone.text, alone.text] and all(r.finish_reason == "length" for r in rest)


@pytest.mark.parametrize("precision", ["torch-int4", "torch-int8"])
def test_a_pass_mixing_a_prompt_chunk_and_a_step_gives_every_row_its_logits_apart(
        engine_for, tiny_checkpoint, tiny_model, precision, monkeypatch):
    """Long prompts join rows that decode; their chunks run inside the decode steps (mixed_step.py). Each such
    pass is checked against the same step and the same chunk run apart, on copies of the caches: every row's
    logits and the chunk's are bit for bit the same (the CPU's quantized kernels are row-independent). The
    replies end as asked."""
    from transformers import DynamicCache

    from server.engine import mixed_step
    from server.engine.batch import Batch, cache_from
    from server.model.forward import prefill

    loaded = loaded_at(tiny_checkpoint, tiny_model, precision)
    mixed_forward = mixed_step.forward
    checked = []  # (batch rows, prompt tokens before the chunk, chunk tokens) of each mixed pass

    def compared_with_apart(model, next_tokens, positions, step, chunk_ids):
        def copy(cache):  # the same tensors in another cache object (updates concatenate: nothing is shared)
            return cache_from(model.config, [(layer.keys, layer.values) for layer in cache.layers])

        apart = Batch(model)
        apart.rows = [dataclasses.make_dataclass("Row", ["next_token"])(token) for token in next_tokens]
        for row in apart.rows:
            row.fed = lambda: None
        apart.pads, apart.cache = list(step.pads), copy(step.batch_cache)
        step_logits = apart.step()
        chunk_logits = prefill(model, chunk_ids, copy(step.prompt_cache) if step.past else DynamicCache(config=model.config))
        logits, prompt_logits = mixed_forward(model, next_tokens, positions, step, chunk_ids)
        assert torch.equal(logits, step_logits) and torch.equal(prompt_logits, chunk_logits)
        checked.append((len(next_tokens), step.past, len(chunk_ids)))
        return logits, prompt_logits

    monkeypatch.setattr(mixed_step, "forward", compared_with_apart)
    jobs = [("hi", 200), ("写一首关于春天的诗", 50), ("hello world 你好 " * 12, 12), ("a b c d e f g " * 9, 9)]
    many = engine_for(loaded, max_batch=len(jobs), prompt_cache_mb=64, prefill_chunk=8)
    assert many.mixed_rows > 8 + len(jobs)  # (8-bit: every size stays on the kernel; 4-bit from ~150 rows)
    first = [many.submit(GenerationRequest(query=q, max_new_tokens=n, **GREEDY)) for q, n in jobs[:2]]
    for job in first:
        job.next_event(timeout=30)
    late = [many.submit(GenerationRequest(query=q, max_new_tokens=n, **GREEDY)) for q, n in jobs[2:]]
    done = [job.wait(timeout=60) for job in late]
    # the first long prompt again: the prefix cache holds all of it but its last token, which runs in a pass
    again = many.submit(GenerationRequest(query=jobs[2][0], max_new_tokens=3, **GREEDY)).wait(timeout=60)
    done = [job.wait(timeout=60) for job in first] + done
    assert [(f.finish_reason, f.completion_tokens) for f in done] == [("length", n) for _, n in jobs]
    assert again.cached_tokens == again.prompt_tokens - 1
    assert max(rows for rows, _, _ in checked) >= 2 and (1, again.cached_tokens, 1) in [
        (min(rows, 1), past, tokens) for rows, past, tokens in checked]
    assert sum(tokens for *_, tokens in checked) >= sum(f.prompt_tokens - f.cached_tokens for f in done[2:])


def test_a_prompt_of_one_chunk_runs_whole_in_the_step_of_others(engine_for, tiny_checkpoint, tiny_model):
    """What is left of a prompt, up to `prefill_chunk` tokens, runs in one pass with the running replies (split
    elsewhere than alone, a prompt would get other roundings in attention on some CPUs: an AMX Xeon's)."""
    loaded = loaded_at(tiny_checkpoint, tiny_model, "torch-int8")
    prompt = GenerationRequest(query="写一首关于春天的诗", max_new_tokens=4, **GREEDY)
    size = engine_for(loaded, max_batch=1, prompt_cache_mb=0).submit(prompt).wait(timeout=60).prompt_tokens
    passes = []
    embed = loaded.model.model.embed_tokens
    forward = embed.forward
    engine = engine_for(loaded, max_batch=4, prompt_cache_mb=0, prefill_chunk=size)
    running = [engine.submit(GenerationRequest(query=q, max_new_tokens=300, **GREEDY)) for q in ("hi", "yo")]
    for job in running:
        job.next_event(timeout=30)
    embed.forward = lambda ids: (passes.append(ids.shape[1]), forward(ids))[1]
    try:
        engine.submit(prompt).wait(timeout=60)
    finally:
        del embed.forward
    assert 2 + size in passes and max(passes) == 2 + size  # the two replies' tokens and the whole prompt
    engine.interrupt()


def test_no_pass_mixes_more_rows_than_the_quantized_layers_keep_on_their_kernels(engine_for, tiny_checkpoint,
                                                                                  tiny_model, monkeypatch):
    """From `dense_from_tokens` rows a quantized layer expands its weights to bfloat16, which would round the
    decoding rows otherwise than their steps apart: mixed passes stay below that, and chunks run apart there."""
    from server.model.cpu_quant import QuantizedLinear

    plan = dataclasses.replace(cpu_plan(bits=8, dtype="bfloat16"), backend="torch", int8_kernel="torch")
    loaded = load_model(tiny_checkpoint, plan)  # (torch's int8 kernel: its layers keep W to expand)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    layers[3].dense_from_tokens = 7
    chunks = []  # prompt tokens of each chunk: inside a step (mixed) or apart
    mixed, apart = Engine._chunk_and_step, Engine._prefill_chunk
    monkeypatch.setattr(Engine, "_chunk_and_step", lambda self, size: (chunks.append(("mixed", size)),
                                                                       mixed(self, size))[1])
    monkeypatch.setattr(Engine, "_prefill_chunk", lambda self: (chunks.append(("apart", 0)), apart(self))[1])
    for chunk, ways in ((4, {"mixed"}), (8, {"apart", "mixed"})):  # 1 + 4 rows mix; 1 + 7 do not, the last few do
        # (token chunks here: a prompt whose rows expand may otherwise run layer by layer, test_layered_prefill.py)
        engine = engine_for(loaded, max_batch=4, prompt_cache_mb=0, prefill_chunk=chunk, layered_from=0)
        assert engine.mixed_rows == 6
        running = engine.submit(GenerationRequest(query="hi", max_new_tokens=300, **GREEDY))
        running.next_event(timeout=30)
        chunks.clear()
        done = engine.submit(GenerationRequest(query="hello world 你好 " * 4, max_new_tokens=3, **GREEDY)).wait(60)
        assert done.finish_reason == "length" and {way for way, _ in chunks} == ways
        assert all(1 + size <= 6 for way, size in chunks if way == "mixed")
        engine.interrupt()

"""A long prompt whose rows make the quantized layers expand their weights runs one decoder layer per decode step
of the others (engine/layered_prefill.py): the others keep decoding, and the prompt gets the logits it gets run
whole alone."""

import dataclasses
import sys

import pytest
import requests

from server.engine.budget import GenerationRequest
from server.engine.engine import Engine
from server.engine.layered_prefill import LayeredPiece, layered_from, pass_tokens
from server.engine.sizing import PROMPT_PIECE
from server.model.cpu_quant import QuantizedLinear
from server.model.loader import load_model
from tests.conftest import cpu_plan

GREEDY = dict(temperature=0.0)
LONG = "写一首关于春天的诗, hello world " * 3
LAYERED = 32  # what the rule gives 2 layers and 16-token chunks where a layer pass is cheap (the last test)


@pytest.fixture(scope="module")
def expanding(tiny_checkpoint):
    """The tiny model at 8 bits on torch's int8 kernel, whose layers expand their weights to bfloat16 from 8
    prompt rows (on a real model: from tens of rows, as cpu_kernels.py measures). With its 2 layers no piece
    passes through a layer cheaper than a chunk through both on the kernel (pass_tokens): the engines below
    are told from how many tokens to run by layers (LAYERED)."""
    plan = dataclasses.replace(cpu_plan(bits=8, dtype="bfloat16"), backend="torch", int8_kernel="torch")
    loaded = load_model(tiny_checkpoint, plan)
    for layer in loaded.model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.dense_from_tokens = 8
    return loaded


def layers(loaded) -> int:
    return loaded.model.config.num_hidden_layers


@pytest.mark.parametrize("cached", [False, True])
def test_a_long_prompt_runs_one_layer_per_step_of_the_others_and_gets_its_reply_alone(engine_for, expanding,
                                                                                       monkeypatch, cached):
    """`cached`: the prompt continues one the prefix cache holds; only the rest runs, over its keys."""
    query = LONG + " once more," * 8 if cached else LONG
    request = dict(query=query, max_new_tokens=6, logprobs=3, **GREEDY)
    prompt_cache_mb = 64 if cached else 0
    alone_engine = engine_for(expanding, max_batch=1, prompt_cache_mb=prompt_cache_mb)
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=prompt_cache_mb, prefill_chunk=16,
                        layered_from=LAYERED)
    if cached:
        for each in (alone_engine, engine):
            each.submit(GenerationRequest(query=LONG, max_new_tokens=2, **GREEDY)).wait(60)
    alone_job = alone_engine.submit(GenerationRequest(**request))
    alone = alone_job.wait(60)
    assert (alone.cached_tokens > 0) == cached
    assert engine.layered_piece == PROMPT_PIECE and alone.prompt_tokens - alone.cached_tokens >= LAYERED

    running = engine.submit(GenerationRequest(query="hi", max_new_tokens=300, **GREEDY))
    running.next_event(timeout=30)
    decoded = []  # the running reply's tokens at each layer pass of the long prompt
    layer_pass = Engine._layer_pass
    monkeypatch.setattr(Engine, "_layer_pass", lambda self, waiting: (
        decoded.append(self._batch.rows[0].completion_tokens), layer_pass(self, waiting))[1])
    together_job = engine.submit(GenerationRequest(**request))
    together = together_job.wait(60)
    engine.interrupt()

    assert together.cached_tokens == alone.cached_tokens
    assert len(decoded) == layers(expanding)  # the whole prompt in one piece, a layer a pass
    assert all(b > a for a, b in zip(decoded, decoded[1:]))  # the other reply decoded between the passes
    assert together.text == alone.text and together.completion_tokens == 6
    assert [(t.logprob, t.top) for t in together_job.logprobs] == [(t.logprob, t.top) for t in alone_job.logprobs]


def test_a_prompt_longer_than_a_piece_runs_piece_by_piece_and_its_short_rest_in_token_chunks(engine_for, expanding,
                                                                                             monkeypatch):
    request = GenerationRequest(query=LONG + " once more," * 8, max_new_tokens=3, **GREEDY)
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=0, prefill_chunk=16, layered_from=LAYERED)
    tokens = len(engine.fit(request).ids)
    engine.layered_piece = (tokens - 20) // 2  # two pieces, and a rest shorter than LAYERED: token chunks
    assert engine.layered_piece >= LAYERED > tokens - 2 * engine.layered_piece
    pieces = []
    start = LayeredPiece.__init__
    monkeypatch.setattr(LayeredPiece, "__init__", lambda piece, model, ids, cache: (
        pieces.append(len(ids)), start(piece, model, ids, cache))[1])
    running = engine.submit(GenerationRequest(query="hi", max_new_tokens=300, **GREEDY))
    running.next_event(timeout=30)
    done = engine.submit(request).wait(60)
    engine.interrupt()
    assert done.finish_reason == "length" and done.prompt_tokens == tokens
    assert pieces == [engine.layered_piece] * 2  # (the rest ran in token chunks: the prompt is whole)


def test_short_prompts_and_idle_engines_do_not_run_layer_by_layer(engine_for, expanding, monkeypatch):
    passes = []
    layer_pass = Engine._layer_pass
    monkeypatch.setattr(Engine, "_layer_pass", lambda self, waiting: (passes.append(1), layer_pass(self, waiting))[1])
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=0, prefill_chunk=16, layered_from=LAYERED)
    engine.submit(GenerationRequest(query=LONG, max_new_tokens=2, **GREEDY)).wait(60)  # nothing else decodes
    running = engine.submit(GenerationRequest(query="hi", max_new_tokens=300, **GREEDY))
    running.next_event(timeout=30)
    short = engine.submit(GenerationRequest(query="yo", max_new_tokens=2, **GREEDY)).wait(60)
    engine.interrupt()
    assert short.prompt_tokens < engine.layered_from and passes == []


def kernels(kernel_rows_ms: float, dense_rows_ms: float, expand_ms: float, int8: str = "onednn") -> dict:
    """The start-up timings as the loader keeps them (cpu_kernels.py: 32 rows on the int4 kernel, 128 on the
    bfloat16 matmul, expanding the matrix); with int8 "torch" the same figures for torch's int8 kernel."""
    prefill = {"int4": kernel_rows_ms, "bfloat16": dense_rows_ms, "expand-int4": expand_ms}
    if int8 == "torch":
        prefill.update({"int8-torch": kernel_rows_ms, "expand-int8": expand_ms})
    return {"int8": int8, "dense_dtype": "bfloat16", "measured": {"prefill_ms": prefill}}


def test_a_layer_pass_reads_the_figures_of_the_int4_kernel_in_use():
    on_torch = kernels(26.6, 12.4, 116.3)
    on_torch["measured"]["prefill_ms"].update({"int4-vnni": 13.3, "expand-int4-vnni": 50.0})
    on_vnni = dict(on_torch, int4="vnni")
    assert pass_tokens(on_vnni, 4, 28, 16) == int((28 * 16 * 13.3 / 32 - 50.0) / (12.4 / 128))
    assert pass_tokens(on_torch, 4, 28, 16) == int((28 * 16 * 26.6 / 32 - 116.3) / (12.4 / 128))


def test_a_layer_pass_takes_as_many_tokens_as_keep_it_within_a_chunks_pass():
    """Figures of the kind measured at start: on an AMX Xeon (a row 0.83 ms on the kernel, 0.1 dense) a whole
    piece fits; where the dense rows cost more (AVX512 without AMX) a fraction; a chunk through 2 layers on the
    kernel is cheaper than one expansion: none."""
    xeon = kernels(26.6, 12.4, 116.3)  # a chunk's pass: 28 x 16 x 0.83 = 372 ms a matrix
    assert pass_tokens(xeon, 4, 28, 16) == int((28 * 16 * 26.6 / 32 - 116.3) / (12.4 / 128)) > PROMPT_PIECE
    slower_dense = kernels(26.6, 60.0, 116.3)
    assert 448 < pass_tokens(slower_dense, 4, 28, 16) < PROMPT_PIECE // 2
    assert pass_tokens(xeon, 4, 2, 16) == 0  # 2 layers: 26.6 ms of kernel rows, 116 of expansion
    assert pass_tokens(xeon, 8, 28, 16) == 0  # no int8 timings: oneDNN's GEMM does not expand
    assert pass_tokens(None, 4, 28, 16) == 0  # a GPU: nothing measured


def test_where_layers_never_expand_or_passes_cost_more_prompts_run_in_token_chunks(tiny_checkpoint, tiny_model,
                                                                                   expanding):
    assert layered_from(expanding.model, 16, PROMPT_PIECE) == layers(expanding) * 16  # 32 rows: fewer passes
    assert layered_from(expanding.model, 2, PROMPT_PIECE) == 8  # (its layers expand from 8 rows)
    assert layered_from(expanding.model, 16, 64) == 32
    assert layered_from(expanding.model, 16, 63) == sys.maxsize  # a pass within a chunk's: under twice the line
    assert layered_from(tiny_model.model, 4, PROMPT_PIECE) == sys.maxsize  # float32 layers: no kernel to leave
    int4 = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="torch"))
    for layer in int4.model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.dense_from_tokens = sys.maxsize
    assert layered_from(int4.model, 16, PROMPT_PIECE) == sys.maxsize
    for timings, expected in ((kernels(600.0, 12.4, 116.3, "torch"), (32, PROMPT_PIECE)),  # slow kernel rows
                              (kernels(26.6, 12.4, 116.3, "torch"), (sys.maxsize, 0))):  # 2 layers: 27 < 116
        engine = Engine(prefill_chunk=16)
        engine.attach(dataclasses.replace(expanding, cpu_kernels=timings))
        try:
            assert (engine.layered_from, engine.layered_piece) == expected
        finally:
            engine.close()


@pytest.mark.parametrize("what", ["interrupted", "fails"])
def test_a_prompt_interrupted_or_failing_between_its_layers_leaves_the_others_decoding(engine_for, expanding,
                                                                                       monkeypatch, what):
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=0, prefill_chunk=16, layered_from=LAYERED)
    running = engine.submit(GenerationRequest(query="hi", max_new_tokens=300, **GREEDY))
    running.next_event(timeout=30)
    run_layer = LayeredPiece.run_layer
    jobs = []

    def after_the_first_layer(piece):
        if piece.next_layer == 1:
            if what == "fails":
                raise RuntimeError("out of memory in a layer")
            jobs[0].cancel()
        return run_layer(piece)

    monkeypatch.setattr(LayeredPiece, "run_layer", after_the_first_layer)
    jobs.append(engine.submit(GenerationRequest(query=LONG, max_new_tokens=4, **GREEDY)))
    result = jobs[0].wait(60)
    assert result.finish_reason == ("interrupted" if what == "interrupted" else "error")
    assert what == "interrupted" or "out of memory in a layer" in result.error
    before = running.next_event(timeout=30).completion_tokens
    assert running.next_event(timeout=30).completion_tokens > before  # the other reply goes on
    monkeypatch.setattr(LayeredPiece, "run_layer", run_layer)
    again = engine.submit(GenerationRequest(query=LONG, max_new_tokens=2, **GREEDY)).wait(60)
    assert again.finish_reason == "length"
    engine.interrupt()


def test_health_says_from_how_many_tokens_prompts_run_by_layers(engine_for, expanding, tiny_model, serve):
    by_layers = serve(engine_for(expanding, prefill_chunk=16, layered_from=LAYERED))
    health = requests.get(by_layers.url + "/health", timeout=10).json()
    assert health["layered_prefill"] == {"from_tokens": LAYERED, "piece_tokens": PROMPT_PIECE}
    in_chunks = serve(engine_for(tiny_model))  # float32 layers: never
    assert requests.get(in_chunks.url + "/health", timeout=10).json()["layered_prefill"] is None

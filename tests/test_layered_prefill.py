"""A long prompt whose rows make the quantized layers expand their weights runs one decoder layer per decode step
of the others (engine/layered_prefill.py): the others keep decoding, and the prompt gets the logits it gets run
whole alone."""

import dataclasses
import sys

import pytest

from server.engine.budget import GenerationRequest
from server.engine.engine import Engine
from server.engine.layered_prefill import LayeredPiece, layered_from
from server.model.cpu_quant import QuantizedLinear
from server.model.loader import load_model
from tests.conftest import cpu_plan

GREEDY = dict(temperature=0.0)
LONG = "写一首关于春天的诗, hello world " * 3


@pytest.fixture(scope="module")
def expanding(tiny_checkpoint):
    """The tiny model at 8 bits on torch's int8 kernel, whose layers expand their weights to bfloat16 from 8
    prompt rows (on a real model: from tens of rows, as cpu_kernels.py measures)."""
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
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=prompt_cache_mb, prefill_chunk=16)
    if cached:
        for each in (alone_engine, engine):
            each.submit(GenerationRequest(query=LONG, max_new_tokens=2, **GREEDY)).wait(60)
    alone_job = alone_engine.submit(GenerationRequest(**request))
    alone = alone_job.wait(60)
    assert (alone.cached_tokens > 0) == cached
    assert engine.layered_from == max(8, layers(expanding) * 16) <= alone.prompt_tokens - alone.cached_tokens

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


def test_short_prompts_and_idle_engines_do_not_run_layer_by_layer(engine_for, expanding, monkeypatch):
    passes = []
    layer_pass = Engine._layer_pass
    monkeypatch.setattr(Engine, "_layer_pass", lambda self, waiting: (passes.append(1), layer_pass(self, waiting))[1])
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=0, prefill_chunk=16)
    engine.submit(GenerationRequest(query=LONG, max_new_tokens=2, **GREEDY)).wait(60)  # nothing else decodes
    running = engine.submit(GenerationRequest(query="hi", max_new_tokens=300, **GREEDY))
    running.next_event(timeout=30)
    short = engine.submit(GenerationRequest(query="yo", max_new_tokens=2, **GREEDY)).wait(60)
    engine.interrupt()
    assert short.prompt_tokens < engine.layered_from and passes == []


def test_where_layers_never_expand_prompts_run_in_token_chunks(tiny_checkpoint, tiny_model, expanding):
    int4 = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="torch"))
    expands = {m.dense_from_tokens for m in int4.model.modules() if isinstance(m, QuantizedLinear)}
    assert layered_from(int4.model, 16) == (sys.maxsize if expands == {sys.maxsize} else
                                            max(min(expands), layers(int4) * 16))
    assert layered_from(expanding.model, 16) == layers(expanding) * 16  # 32 rows: fewer passes than chunks
    assert layered_from(tiny_model.model, 4) == sys.maxsize  # float32 layers: no kernel to leave
    for layer in int4.model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.dense_from_tokens = sys.maxsize
    assert layered_from(int4.model, 16) == sys.maxsize


@pytest.mark.parametrize("what", ["interrupted", "fails"])
def test_a_prompt_interrupted_or_failing_between_its_layers_leaves_the_others_decoding(engine_for, expanding,
                                                                                       monkeypatch, what):
    engine = engine_for(expanding, max_batch=4, prompt_cache_mb=0, prefill_chunk=16)
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

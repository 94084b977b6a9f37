"""The generation engine on the tiny model: streaming, determinism, budget, interrupt, queue, error recovery."""

import dataclasses
import threading

import pytest
import torch

from server.engine import EngineBusy, Update, apply_stop
from server.engine.budget import ContextOverflow, GenerationRequest
from server.engine.sampling import Sampling, sample, vocabulary_mask
from server.model.loader import load_model
from tests.conftest import cpu_plan

GREEDY = dict(temperature=0.0)


def collect(job, timeout=60):
    updates, finished = [], None
    for event in job.events(timeout=timeout):
        if isinstance(event, Update):
            updates.append(event)
        else:
            finished = event
    return updates, finished


def test_reply_streams_token_by_token(engine):
    job = engine.submit(GenerationRequest(query="你好", max_length=80, **GREEDY))
    updates, done = collect(job)
    assert done.finish_reason == "length"
    assert done.completion_tokens == 80 - done.prompt_tokens
    assert len(updates) >= done.completion_tokens // 2  # about one event per token, not one burst
    texts = [u.text for u in updates]
    assert texts[-1] == done.text and len(set(texts)) == len(texts)
    assert [u.completion_tokens for u in updates] == sorted(u.completion_tokens for u in updates)
    assert done.first_token_seconds is not None and done.first_token_seconds <= done.seconds


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine):
    a = engine.submit(GenerationRequest(query="hello", max_length=60, **GREEDY)).wait()
    b = engine.submit(GenerationRequest(query="hello", max_length=60, **GREEDY)).wait()
    assert a.text == b.text and a.text
    s1 = engine.submit(GenerationRequest(query="hello", max_length=60, temperature=1.2, top_p=0.95, seed=5)).wait()
    s2 = engine.submit(GenerationRequest(query="hello", max_length=60, temperature=1.2, top_p=0.95, seed=5)).wait()
    s3 = engine.submit(GenerationRequest(query="hello", max_length=60, temperature=1.2, top_p=0.95, seed=6)).wait()
    assert s1.text == s2.text and s1.text != s3.text


def test_reply_matches_a_manual_greedy_decode(engine, tiny_model):
    prompt = tiny_model.tokenizer.build_prompt("hello", [])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = tiny_model.model(torch.tensor([ids])).logits[0, -1]
            logits[tiny_model.tokenizer.first_special_id:] = float("-inf")
            ids.append(int(logits.argmax()))
    expected = tiny_model.tokenizer.decode(ids[len(prompt):]).strip()
    done = engine.submit(GenerationRequest(query="hello", max_new_tokens=12, **GREEDY)).wait()
    assert done.text == expected and done.completion_tokens == 12


def test_eos_stops_and_answer_prefix_leads(engine_for, eos_checkpoint):
    engine = engine_for(load_model(eos_checkpoint, cpu_plan()))
    done = engine.submit(GenerationRequest(query="你好", answer_prefix="好的，", temperature=0.9)).wait()
    assert done.finish_reason == "stop" and done.text == "好的，" and done.completion_tokens == 0


def test_answer_prefix_starts_every_update(engine):
    updates, done = collect(engine.submit(GenerationRequest(query="hi", answer_prefix="当然：", max_length=50, **GREEDY)))
    assert all(u.text.startswith("当然：") for u in updates) and done.text.startswith("当然：")


def test_oldest_rounds_are_dropped_to_fit(engine_for, tiny_model):
    engine = engine_for(tiny_model, reply_reserve=32)  # context 256 tokens
    history = [(f"问题{i} hello world", f"回答{i} the model answer") for i in range(12)]
    job = engine.submit(GenerationRequest(query="最后的问题", history=history, **GREEDY))
    assert job.prompt.dropped_rounds > 0
    kept = history[job.prompt.dropped_rounds:]
    assert job.prompt.ids == tiny_model.tokenizer.build_prompt("最后的问题", kept)
    assert len(job.prompt.ids) <= 256 - 32
    assert len(tiny_model.tokenizer.build_prompt("最后的问题", history[job.prompt.dropped_rounds - 1:])) > 256 - 32
    done = job.wait()
    assert done.dropped_rounds == job.prompt.dropped_rounds
    assert done.prompt_tokens + done.completion_tokens == 256


def test_query_too_long_is_refused_with_counts(engine):
    with pytest.raises(ContextOverflow) as err:
        engine.submit(GenerationRequest(query="hello world " * 200))
    assert err.value.prompt_tokens > err.value.limit and err.value.max_context == 256
    assert "tokens" in str(err.value) and "shorten" in str(err.value)


def test_max_length_is_clamped_to_the_context(engine):
    done = engine.submit(GenerationRequest(query="hi", max_length=100000, **GREEDY)).wait()
    assert done.prompt_tokens + done.completion_tokens == 256


def test_max_new_tokens_counts_reply_only(engine):
    done = engine.submit(GenerationRequest(query="hi", max_new_tokens=7, **GREEDY)).wait()
    assert done.completion_tokens == 7 and done.finish_reason == "length"


def test_interrupt_stops_the_running_job_within_a_token(engine):
    job = engine.submit(GenerationRequest(query="hi", **GREEDY))
    first = job.next_event(timeout=30)
    assert isinstance(first, Update)
    assert engine.interrupt() is True
    _, done = collect(job)
    assert done.finish_reason == "interrupted"
    assert done.completion_tokens <= first.completion_tokens + 2
    assert done.text.startswith(first.text[:1])
    assert engine.interrupt() is False  # nothing runs any more


def test_interrupt_a_queued_job_by_id_and_keep_order(engine_for, tiny_model):
    engine = engine_for(tiny_model, max_batch=1)
    jobs = [engine.submit(GenerationRequest(query=f"q{i}", max_new_tokens=30, **GREEDY)) for i in range(3)]
    assert engine.interrupt(jobs[2].id) is True
    assert jobs[2].wait(timeout=5).finish_reason == "interrupted"  # ends at once, before the others
    assert jobs[0].result is None or jobs[1].result is None
    results = [j.wait() for j in jobs[:2]]
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert engine.interrupt("no-such-id") is False


def test_jobs_run_in_submission_order(engine_for, tiny_model):
    engine = engine_for(tiny_model, max_batch=1)
    order = []
    jobs = [engine.submit(GenerationRequest(query=f"q{i}", max_new_tokens=5, **GREEDY)) for i in range(4)]
    threads = [threading.Thread(target=lambda j=j, i=i: (j.wait(), order.append(i))) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert order == [0, 1, 2, 3]
    ends = [j.result.seconds + j.submitted for j in jobs]
    assert ends == sorted(ends)


def test_a_full_queue_refuses_work(engine_for, tiny_model):
    engine = engine_for(tiny_model, max_queue=1, max_batch=1)
    running = engine.submit(GenerationRequest(query="a", **GREEDY))
    running.next_event(timeout=30)  # it left the queue and runs
    engine.submit(GenerationRequest(query="b", **GREEDY))
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(GenerationRequest(query="c", **GREEDY))
    engine.interrupt()


def test_model_error_ends_that_job_and_the_engine_goes_on(engine, tiny_model, monkeypatch):
    real_forward = tiny_model.model.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # a GPU running out of memory mid-reply (no GPU here to do it for real)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model.model, "forward", flaky_forward)
    failed = engine.submit(GenerationRequest(query="hi", max_new_tokens=10, **GREEDY)).wait()
    assert failed.finish_reason == "error" and "out of memory" in failed.error
    assert failed.completion_tokens == 2  # the partial reply is kept
    ok = engine.submit(GenerationRequest(query="hi", max_new_tokens=10, **GREEDY)).wait()
    assert ok.finish_reason == "length" and ok.completion_tokens == 10


def test_a_model_error_in_a_pass_mixing_a_prompt_and_a_step_ends_both_jobs_and_the_engine_goes_on(
        engine_for, slow_model, monkeypatch):
    """On the CPU a prompt chunk runs in the decode step of the running replies (mixed_step.py): a pass that fails
    ends the replies and the joining job with the error; the next requests run."""
    norm = slow_model.model.model.norm
    real_norm = norm.forward
    mixed_passes = []

    def failing_once_mixed(hidden):
        if hidden.shape[1] == 8:  # the running reply's token and a 7-token chunk
            mixed_passes.append(hidden.shape)
            if len(mixed_passes) == 2:  # (no way to run out of memory here for real)
                raise torch.OutOfMemoryError("CPU out of memory. Tried to allocate 2.00 GiB")
        return real_norm(hidden)

    monkeypatch.setattr(norm, "forward", failing_once_mixed)
    # (mixed passes are on for this dense model too: by default only quantized models mix, exactly)
    engine = engine_for(slow_model, max_batch=4, prompt_cache_mb=0, prefill_chunk=8, mixed_steps=True)
    running = engine.submit(GenerationRequest(query="hi", max_new_tokens=200, **GREEDY))
    running.next_event(timeout=30)
    joining = engine.submit(GenerationRequest(query="hello world 你好 " * 10, max_new_tokens=5, **GREEDY))
    for job in (running, joining):
        failed = job.wait(timeout=60)
        assert failed.finish_reason == "error" and "out of memory" in failed.error
    assert joining.result.completion_tokens == 0 and running.result.completion_tokens > 1
    ok = engine.submit_all([GenerationRequest(query=q, max_new_tokens=6, **GREEDY) for q in ("a", "b")])
    assert [job.wait(timeout=60).completion_tokens for job in ok] == [6, 6]
    assert engine.state == "ready"


def test_stop_strings_end_the_reply_before_them(engine):
    full = engine.submit(GenerationRequest(query="hello", max_new_tokens=40, **GREEDY)).wait().text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = engine.submit(GenerationRequest(query="hello", max_new_tokens=40, stop=[stop], **GREEDY))
    updates, done = collect(cut)
    assert done.finish_reason == "stop" and done.text == full[: full.find(stop)].strip()
    assert not any(stop in u.text for u in updates)


@pytest.mark.parametrize("text, stops, visible, hit", [
    ("hello world", ["wor"], "hello ", True),
    ("hello wo", ["world"], "hello ", False),
    ("hello", [], "hello", False),
    ("abcabc", ["ca", "bc"], "a", True),
])
def test_apply_stop(text, stops, visible, hit):
    assert apply_stop(text, stops) == (visible, hit)


def test_special_and_padding_ids_are_never_sampled():
    vocab, first_special, eos = 64, 40, 2
    mask = vocabulary_mask(vocab, first_special, {eos}, "cpu")
    logits = torch.zeros(vocab)
    logits[41], logits[60] = 50.0, 50.0  # a special id and a padding id look most likely
    assert sample(logits + mask, Sampling(temperature=0), None) not in (41, 60)
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits + mask, Sampling(temperature=2.0, top_p=1.0), g) for _ in range(300)}
    assert draws and max(draws) < first_special
    logits[eos] = 100.0
    assert sample(logits + mask, Sampling(temperature=0), None) == eos


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, Sampling(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert draws == {0, 1}


@pytest.mark.parametrize("backend, bits, layer_type", [
    ("bnb", 8, "Linear8bitLt"), ("bnb", 4, "Linear4bit"),  # CUDA's backend (and the CPU's on Windows)
    ("torch", 8, "Int8Linear"), ("torch", 4, "Int4Linear"),  # the CPU's: torch's own kernels, cached quantized
])
def test_quantized_model_on_cpu(tiny_checkpoint, tiny_model, engine_for, backend, bits, layer_type):
    plan = dataclasses.replace(cpu_plan(bits=bits, dtype="bfloat16"), backend=backend)
    loaded = load_model(tiny_checkpoint, plan)
    layer = loaded.model.model.layers[0].mlp.gate_up_proj
    assert type(layer).__name__ == layer_type
    ids = torch.tensor([loaded.tokenizer.build_prompt("hello world", [])])
    with torch.no_grad():
        quant, exact = loaded.model(ids).logits[0, -1].float(), tiny_model.model(ids).logits[0, -1]
    # close to the float32 logits, as quantization allows
    assert torch.corrcoef(torch.stack([quant, exact]))[0, 1] > 0.9
    done = engine_for(loaded).submit(GenerationRequest(query="hello", max_new_tokens=8, **GREEDY)).wait()
    assert done.finish_reason == "length" and done.completion_tokens == 8

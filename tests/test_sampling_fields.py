"""Sampling fields people send (penalties, top_k, min_p, logit_bias) take effect; fields the server does not
implement are refused by name."""

import openai
import pytest
import requests
import torch

from server.engine.budget import GenerationRequest
from server.engine.sampling import Penalties, PenaltyState, logits_to_probs
from server.model.forward import decode_one_token, prefill


def test_presence_and_frequency_penalties_follow_openais_formula():
    state = PenaltyState(Penalties(presence=0.5, frequency=0.25), prompt_ids=[7], vocab_size=10, device="cpu")
    for token in (3, 3, 4):
        state.add(token)
    logits = torch.zeros(10)
    out = state.apply(logits)
    assert out[3] == pytest.approx(-(2 * 0.25 + 0.5)) and out[4] == pytest.approx(-(0.25 + 0.5))
    assert out[7] == 0 and out[0] == 0  # the prompt does not count for these two


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    state = PenaltyState(Penalties(repetition=2.0), prompt_ids=[1, 2], vocab_size=4, device="cpu")
    out = state.apply(torch.tensor([3.0, 3.0, -3.0, 3.0]))
    assert out.tolist() == [3.0, 1.5, -6.0, 3.0]


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (logits_to_probs(logits, 1.0, 1.0, top_k=2) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, 1.0, 1.0, min_p=0.25) > 0).tolist() == [True, True, True, False]
    probs = logits_to_probs(logits, 1.0, 1.0, top_k=2)
    assert probs.sum().item() == pytest.approx(1.0) and probs[0].item() == pytest.approx(0.5 / 0.8)


@torch.inference_mode()
def reference_greedy(loaded, prompt_ids, steps, presence=0.0, frequency=0.0):
    """The greedy loop with OpenAI's penalties written out again, independently of the engine."""
    from transformers import DynamicCache

    model, tok = loaded.model, loaded.tokenizer
    cache = DynamicCache(config=model.config)
    logits = prefill(model, prompt_ids, cache)
    counts, out = {}, []
    for _ in range(steps):
        logits = logits.float().clone()
        logits[tok.first_special_id:] = float("-inf")  # (eos, id 2, is below them)
        for token, c in counts.items():
            logits[token] -= c * frequency + presence
        token = int(logits.argmax())
        if token == tok.eos_id:
            break
        out.append(token)
        counts[token] = counts.get(token, 0) + 1
        logits = decode_one_token(model, token, cache)
    return out


def test_penalised_greedy_reply_equals_the_reference_loop(engine, tiny_model):
    request = GenerationRequest(query="重复 重复 重复", max_new_tokens=24, temperature=0, presence_penalty=1.5,
                                frequency_penalty=0.5)
    job = engine.submit(request)
    finished = job.wait()
    expected = reference_greedy(tiny_model, job.prompt.ids, 24, presence=1.5, frequency=0.5)
    plain = reference_greedy(tiny_model, job.prompt.ids, 24)
    assert finished.generated == tiny_model.tokenizer.decode(expected)
    assert expected != plain  # the penalties changed this reply: the comparison is not vacuous


def test_sampling_fields_reach_the_engine_through_the_api(server_api):
    client = openai.OpenAI(base_url=server_api.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "重复 重复 重复"}]
    plain = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0, max_tokens=24)
    penalised = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0, max_tokens=24,
                                               presence_penalty=1.5, frequency_penalty=0.5)
    expected = server_api.backing.submit(GenerationRequest(query=messages[0]["content"], max_new_tokens=24,
                                                           temperature=0, presence_penalty=1.5,
                                                           frequency_penalty=0.5)).wait()
    assert penalised.choices[0].message.content == expected.text != plain.choices[0].message.content
    # top_k=1 is greedy whatever the temperature; repetition_penalty and min_p are taken from extra_body
    top1 = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=1.5, max_tokens=24,
                                          extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.0})
    assert top1.choices[0].message.content == plain.choices[0].message.content


def test_logit_bias_bans_a_token(server, engine, tiny_model):
    job = engine.submit(GenerationRequest(query="hi", max_new_tokens=6, temperature=0))
    base, first = job.wait(), reference_greedy(tiny_model, job.prompt.ids, 1)[0]
    r = requests.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "logit_bias": {str(first): -100}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] != base.text
    bad = requests.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 5}})
    assert bad.status_code == 400 and "not in the vocabulary" in bad.json()["error"]["message"]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/stream", {"query": "hi"}),
    ("/generate", {"query": "hi"}),
])
def test_an_unknown_field_is_refused_by_name(server, route, body):
    r = requests.post(server.url + route, json={**body, "max_tokens_typo": 5, "mirostat": 2})
    assert r.status_code == 400
    message = r.json()["error"]["message"] if "error" in r.json() else r.json()["message"]
    assert "'max_tokens_typo'" in message and "'mirostat'" in message


def test_fields_that_describe_the_caller_are_accepted(server):
    r = requests.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u1", "store": False,
        "metadata": {"a": "b"}, "service_tier": "auto"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value", [("presence_penalty", 3), ("top_k", -2), ("min_p", 1.5),
                                          ("repetition_penalty", 0)])
def test_out_of_range_knobs_are_400(server, field, value):
    r = requests.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"]

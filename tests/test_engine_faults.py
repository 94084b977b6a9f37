"""No request can kill the engine: extreme sampling values, a broken model, a failing row, a dead worker."""

import json

import pytest
import requests
import torch

from server.engine import NotReady
from server.engine import sequence as sequence_module
from server.engine.budget import GenerationRequest
from server.engine.sampling import Sampling, logits_to_probs, sample

GREEDY = dict(temperature=0.0)
# Inside the allowed ranges, yet each broke sampling: top_p this small is 0 in float32, and every token was dropped
EXTREMES = [
    {"top_p": 1e-300},
    {"top_p": 7e-46},
    {"top_p": 1e-300, "temperature": 2.0},
    {"top_p": 1e-300, "temperature": 1e-5},
    {"top_p": 1.0, "temperature": 1e-5},
    {"top_p": 5e-324, "temperature": 1e-4},
]


@pytest.mark.parametrize("top_p", [1e-300, 7e-46, 5e-324, 1e-8])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    probs = logits_to_probs(logits, 1.0, top_p)
    assert torch.isfinite(probs).all() and probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, Sampling(temperature=1.0, top_p=top_p), g) for _ in range(50)} == {1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_with_nan_or_inf_are_sampled_without_an_error(bad):
    logits = torch.tensor([0.5, 2.0, bad, 1.0])
    g = torch.Generator().manual_seed(0)
    token = sample(logits, Sampling(temperature=0.8, top_p=0.9), g)
    assert token == (1 if bad != bad else 2)  # nan counts as least likely; +inf is the most likely
    assert sample(logits, Sampling(temperature=0), None) == token


def post_reply(url: str, route: str, fields: dict) -> requests.Response:
    if route == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, **fields}
    else:
        body = {"query": "你好", "max_length": 40, **fields}
        if route == "/generate":
            body["stream"] = False
    return requests.post(url + route, json=body, timeout=60)


def reply_of(route: str, r: requests.Response) -> str:
    if route == "/v1/chat/completions":
        return r.json()["choices"][0]["message"]["content"]
    if route == "/generate":  # not streamed: the reply as plain text
        return r.text
    replies = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    replies = [event[0] for event in replies if isinstance(event, list)]  # the seed's [response, history]
    assert replies, r.text[-300:]
    return replies[-1]


@pytest.mark.parametrize("route", ["/stream", "/generate", "/v1/chat/completions"])
def test_extreme_sampling_values_answer_and_the_engine_goes_on(server, route):
    for fields in EXTREMES:
        r = post_reply(server.url, route, fields)
        assert r.status_code == 200, (fields, r.text)
        assert "error" not in r.text, (fields, r.text[-300:])
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["status"] == "ready" and health["running_jobs"] == [] and health["queue"] == 0
    normal = post_reply(server.url, route, {"temperature": 0})
    assert normal.status_code == 200 and reply_of(route, normal)
    assert server.engine._worker.is_alive()


def test_a_failing_row_ends_its_job_only(engine_for, slow_model, monkeypatch):
    engine = engine_for(slow_model, max_batch=4)
    advance = sequence_module.Sequence.advance

    def advance_or_fail(self, logits):
        if self.job.request.query == "boom" and self.completion_tokens == 3:
            raise RuntimeError("a sampler fault")
        return advance(self, logits)

    monkeypatch.setattr(sequence_module.Sequence, "advance", advance_or_fail)
    others = [engine.submit(GenerationRequest(query=f"q{i}", max_new_tokens=12, **GREEDY)) for i in range(2)]
    boom = engine.submit(GenerationRequest(query="boom", max_new_tokens=12, **GREEDY))
    failed = boom.wait(timeout=60)
    assert failed.finish_reason == "error" and "a sampler fault" in failed.error
    assert failed.completion_tokens == 3  # what it made so far is kept
    for job in others:
        done = job.wait(timeout=60)
        assert done.finish_reason == "length" and done.completion_tokens == 12
    assert engine.state == "ready"
    assert engine.submit(GenerationRequest(query="again", max_new_tokens=4, **GREEDY)).wait(60).completion_tokens == 4


def test_a_fault_outside_any_job_fails_the_running_jobs_and_the_engine_goes_on(engine_for, slow_model, monkeypatch):
    engine = engine_for(slow_model)
    calls = {"n": 0}
    real_step = type(engine)._step

    def step_once_broken(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("a scheduler fault")
        return real_step(self)

    monkeypatch.setattr(type(engine), "_step", step_once_broken)
    failed = engine.submit(GenerationRequest(query="hi", max_new_tokens=10, **GREEDY)).wait(timeout=60)
    assert failed.finish_reason == "error" and "a scheduler fault" in failed.error
    ok = engine.submit(GenerationRequest(query="hi", max_new_tokens=5, **GREEDY)).wait(timeout=60)
    assert ok.finish_reason == "length" and ok.completion_tokens == 5


class WorkerKilled(BaseException):
    """What no `except Exception` catches (as SystemExit or a C-level abort would end the thread)."""


def test_a_dead_worker_is_reported_by_health_and_refuses_work(serve, engine_for, slow_model, monkeypatch):
    engine = engine_for(slow_model, max_batch=1)
    server = serve(engine)

    def die(self):
        raise WorkerKilled("gone")

    running = engine.submit(GenerationRequest(query="a", max_new_tokens=50, **GREEDY))
    running.next_event(timeout=30)
    queued = engine.submit(GenerationRequest(query="b", max_new_tokens=5, **GREEDY))
    monkeypatch.setattr(type(engine), "_step", die)
    for job in (running, queued):  # neither hangs: both end with the reason
        assert job.wait(timeout=30).finish_reason == "error"
    engine._worker.join(timeout=10)
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert "engine worker stopped" in health.json()["error"]
    with pytest.raises(NotReady):
        engine.submit(GenerationRequest(query="c", **GREEDY))
    r = requests.post(server.url + "/generate", json={"query": "hi", "stream": False}, timeout=10)
    assert r.status_code == 503 and "engine worker stopped" in r.json()["message"]

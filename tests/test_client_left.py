"""A client that leaves stops its work on every route, also when it did not ask for a stream."""

import logging
import time

import openai
import pytest
import requests


def running_jobs(engine) -> list[str]:
    return engine.running_ids + engine.queued_ids


def wait_until_idle(engine, seconds: float) -> float:
    """How long the engine took to drop every job (fails after `seconds`)."""
    start = time.perf_counter()
    while running_jobs(engine):
        assert time.perf_counter() - start < seconds, f"still running: {running_jobs(engine)}"
        time.sleep(0.02)
    return time.perf_counter() - start


def wait_until_busy(engine, seconds: float = 10) -> None:
    start = time.perf_counter()
    while not running_jobs(engine):
        assert time.perf_counter() - start < seconds, "the job never started"
        time.sleep(0.01)


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "写一篇长文"}], "max_tokens": 2000}),
    ("/generate", {"query": "写一篇长文", "max_length": 2000}),
])
def test_a_non_streamed_request_whose_client_times_out_is_interrupted(serve_api, engine_for, slow_model, caplog,
                                                                      route, body):
    engine = engine_for(slow_model, max_queue=4)
    server = serve_api(engine)
    caplog.set_level(logging.INFO, logger="server.requests")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + route, json={**body, "temperature": 0.9}, timeout=0.6)
    assert wait_until_idle(engine, seconds=1.5) < 1.5  # the client's timeout, then within a second
    lines = [r.getMessage() for r in caplog.records if r.name == "server.requests" and route in r.getMessage()]
    assert any("finish=interrupted" in line for line in lines), lines


def test_the_sdk_timeout_and_its_retries_leave_no_orphans(server_api, serve, engine_for, slow_model):
    engine = engine_for(slow_model, max_queue=4)
    server = serve(engine)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=0.5, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="chatglm2-6b", max_tokens=2000,
                                       messages=[{"role": "user", "content": "写一篇长文"}])
    wait_until_idle(engine, seconds=1.5)
    assert engine.state == "ready"


def test_a_client_that_stays_gets_its_answer(server, engine):
    wait_until_idle(engine, 1)
    r = requests.post(server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_model_is_named_and_retrievable(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["chatglm2-6b"]
    assert client.models.retrieve("chatglm2-6b").id == "chatglm2-6b"
    assert client.models.retrieve("gpt-4o-mini").id == "chatglm2-6b"  # an alias of the one model

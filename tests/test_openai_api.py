"""The OpenAI-compatible API, driven by the official `openai` Python package against the live server."""

import json

import openai
import pytest
import requests

from server.engine.budget import GenerationRequest
from server.web.messages import to_rounds
from server.web.validation import ApiError


@pytest.fixture
def client(server_api):
    """The official client on the local server, and on a front end (--backend) over a vLLM-framed upstream."""
    return openai.OpenAI(base_url=server_api.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_list_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [m.id for m in models.data if m.object == "model"]
    assert len(models.data) == 1 and models.data[0].id  # the model folder's name


def test_non_streaming_completion_with_usage(client, engine):
    result = client.chat.completions.create(model="chatglm2-6b", temperature=0, max_tokens=20,
                                            messages=[{"role": "user", "content": "你好"}])
    expected = engine.submit(GenerationRequest(query="你好", max_new_tokens=20, temperature=0)).wait()
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == expected.prompt_tokens
    assert result.usage.completion_tokens == 20 and result.usage.total_tokens == expected.prompt_tokens + 20


def test_streamed_deltas_equal_the_non_streaming_result(client):
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "天气 怎么样"}]
    whole = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 10
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_ends_with_done_on_the_wire(server_api):
    r = requests.post(server_api.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5, "temperature": 0})
    assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = r.content.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert "usage" not in json.loads(events[0][6:])  # only with stream_options.include_usage


def test_prefill_continues_the_assistant_message(client, engine):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "好的，"}]
    result = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=15)
    expected = engine.submit(GenerationRequest(query="hello", answer_prefix="好的，", max_new_tokens=15,
                                               temperature=0)).wait()
    content = result.choices[0].message.content
    assert not content.startswith("好的，")  # the prefix is not repeated
    assert "好的，" + content.lstrip() == expected.text


def test_stop_strings_cut_before_the_stop(client):
    full = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                          temperature=0, max_tokens=40).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                         temperature=0, max_tokens=40, stop=[stop, "never-there"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.find(stop)].strip()
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=40, stop=stop,
        stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content


def test_max_tokens_gives_length_and_eos_gives_stop(client, serve_api, engine_for, eos_checkpoint):
    from server.model.loader import load_model
    from tests.conftest import cpu_plan

    result = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                            max_completion_tokens=3)
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 3
    eos_server = serve_api(engine_for(load_model(eos_checkpoint, cpu_plan())))
    eos_client = openai.OpenAI(base_url=eos_server.url + "/v1", api_key="x", max_retries=0)
    result = eos_client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert result.choices[0].finish_reason == "stop" and result.choices[0].message.content == ""


def test_seed_makes_sampling_repeatable(client):
    def ask(seed):
        return client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                              temperature=1.3, top_p=0.95, max_tokens=30,
                                              seed=seed).choices[0].message.content
    assert ask(11) == ask(11) != ask(12)


def test_n_below_one_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=0)
    assert err.value.status_code == 400 and "'n' must be >= 1" in err.value.message
    assert err.value.body["param"] == "n"


@pytest.mark.parametrize("kwargs, words", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "at least one user message"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "'temperature' must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text parts"),
])
def test_bad_requests_raise_the_client_error_type(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", **kwargs)
    assert words in err.value.message and err.value.body["type"] == "invalid_request_error"


def test_context_overflow_says_the_counts(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello world " * 200}])
    assert err.value.code == "context_length_exceeded" and "tokens" in err.value.message
    assert "256" in err.value.message


def test_api_key_and_errors_in_openai_shape(serve_api, engine):
    server = serve_api(engine, api_key="k1")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="k1", max_retries=0)
    assert good.models.list().data
    r = requests.get(server.url + "/v1/nothing", headers={"Authorization": "Bearer k1"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_busy_is_429_with_retry_after(serve_api, engine_for, tiny_model):
    from server.engine import EngineBusy

    engine = engine_for(tiny_model, max_queue=0)  # every request finds the queue full (behind a front end: the
    server = serve_api(engine)  # upstream answers 429, and so does the front end)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["Retry-After"] == "5" and "busy" in err.value.message
    assert issubclass(EngineBusy, Exception)


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "q"}], ("q", [], "")),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], ("S\n\nq", [], "")),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
      {"role": "user", "content": "q2"}], ("q2", [("S\n\nq1", "a1")], "")),
    ([{"role": "user", "content": "q1"}, {"role": "user", "content": "more"}], ("q1\n\nmore", [], "")),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "pre"}], ("q", [], "pre")),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], ("ab", [], "")),
])
def test_messages_to_rounds(messages, expected):
    assert to_rounds(messages) == expected


def test_messages_must_be_objects():
    with pytest.raises(ApiError, match="messages\\[0\\]"):
        to_rounds(["hi"])

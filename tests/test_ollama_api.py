"""Ollama's API, driven by the official `ollama` Python client against the real server on the tiny model."""

import json

import jsonschema
import ollama
import pytest
import requests

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "你好"}]


@pytest.fixture
def long_server(serve, engine_for, tiny_checkpoint):
    """Room for tool descriptions (the tiny tokenizer spells Chinese byte by byte)."""
    from server.model.loader import load_model
    from tests.conftest import cpu_plan

    return serve(engine_for(load_model(tiny_checkpoint, cpu_plan(max_context=2048))))


@pytest.fixture
def ollama_for():
    """ollama_for(server, **kwargs) -> an ollama.Client for that server, closed after the test."""
    clients = []

    def make(server, **kwargs):
        clients.append(ollama.Client(host=server.url, timeout=60, **kwargs))
        return clients[-1]

    yield make
    for made in clients:
        made.close()


@pytest.fixture
def client(server, ollama_for):
    return ollama_for(server)


def test_list_ps_show_and_version(client, server):
    listed = client.list().models
    assert [m.model for m in listed] == ["chatglm2-6b:latest"]
    assert listed[0].details.family == "chatglm" and listed[0].details.quantization_level == "F32"
    running = client.ps().models
    assert running[0].model == "chatglm2-6b:latest" and running[0].context_length == server.engine.max_context
    shown = client.show("chatglm2-6b")
    assert "completion" in shown.capabilities and shown.modelinfo["chatglm.context_length"] == 256
    assert requests.get(server.url + "/api/version", timeout=10).json()["version"]


def test_chat_whole_and_streamed_agree(client, server):
    options = {"temperature": 0, "num_predict": 12}
    whole = client.chat(model="chatglm2-6b", messages=ASK, options=options)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat(model="chatglm2-6b", messages=ASK, options=options, stream=True))
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    # the same reply as the seed API gives for the same question
    seed = requests.post(server.url + "/generate", json={"query": "你好", "temperature": 0, "stream": False},
                         timeout=60)
    assert seed.text.startswith(whole.message.content)


def test_generate_and_raw(client):
    result = client.generate(model="chatglm2-6b", prompt="你好", options={"temperature": 0, "num_predict": 6})
    chat = client.chat(model="chatglm2-6b", messages=ASK, options={"temperature": 0, "num_predict": 6})
    assert result.response == chat.message.content and result.done_reason == "length"
    raw = client.generate(model="chatglm2-6b", prompt="Hello", raw=True, options={"temperature": 0, "num_predict": 4})
    assert raw.response and raw.eval_count == 4
    streamed = "".join(p.response for p in client.generate(model="chatglm2-6b", prompt="你好", stream=True,
                                                           options={"temperature": 0, "num_predict": 6}))
    assert streamed == result.response


def test_format_with_a_schema_always_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"]}
    for seed in range(5):
        result = client.chat(model="chatglm2-6b", messages=ASK, format=schema,
                             options={"seed": seed, "temperature": 1.2, "num_predict": 80})
        jsonschema.validate(json.loads(result.message.content), schema)
    for seed in range(4):  # "json": any object, which a random model may write on past num_predict (cut: length)
        any_json = client.generate(model="chatglm2-6b", prompt="给我 JSON", format="json",
                                   options={"seed": seed, "num_predict": 150})
        if any_json.done_reason == "stop":
            assert isinstance(json.loads(any_json.response), dict)
        else:
            assert any_json.done_reason == "length" and any_json.response.startswith("{")


def test_tools_are_offered_and_the_next_turn_is_accepted(long_server, ollama_for):
    """`auto` is all Ollama has: the random model answers in words (a call is decoded under the same grammar as
    /v1's, tested there with tool_choice "required"); a call's turn and its result go back as the next turn."""
    client = ollama_for(long_server)
    messages = [{"role": "user", "content": "北京天气？"}]
    result = client.chat(model="chatglm2-6b", messages=messages, tools=[WEATHER],
                         options={"seed": 1, "num_predict": 40})
    if result.message.tool_calls:
        jsonschema.validate(dict(result.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    else:
        assert result.message.content and not result.message.content.startswith("{")
    called = {"role": "assistant", "content": "",
              "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}
    follow_up = client.chat(model="chatglm2-6b", options={"num_predict": 8}, tools=[WEATHER], messages=[
        *messages, called, {"role": "tool", "content": "晴", "tool_name": "get_weather"}])
    assert follow_up.done and follow_up.eval_count <= 8


def test_ollama_tool_turns_map_onto_rounds():
    from server.web.messages import to_rounds

    query, history, _ = to_rounds([
        {"role": "user", "content": "天气？"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "北京"}}}]},
        {"role": "tool", "content": "晴", "tool_name": "get_weather"}])
    assert history == [("天气？", '{"name": "get_weather", "arguments": {"city": "北京"}}')]
    assert query.startswith("工具 get_weather 的结果") and query.endswith("晴")


def test_a_call_is_reported_in_ollamas_shape():
    from server.engine import Finished
    from server.web.ollama_api import ChatShape
    from server.web.tool_calls import tool_use

    call = '{"name": "get_weather", "arguments": {"city": "北京"}}'
    finished = Finished(finish_reason="stop", text=call, generated=" " + call, prompt_tokens=5,
                        completion_tokens=9, dropped_rounds=0, seconds=1.0, first_token_seconds=0.5)
    expected = [{"function": {"name": "get_weather", "arguments": {"city": "北京"}}}]
    tools = tool_use({"tools": [{"type": "function", "function": {"name": "get_weather"}}]})
    assert ChatShape(tools).whole(finished)["message"]["tool_calls"] == expected
    streamed = ChatShape(tools).deltas(finished)
    assert [d["message"].get("tool_calls") for d in streamed] == [expected]
    assert ChatShape(None).whole(finished)["message"]["content"] == call  # without tools: words as they are


@pytest.mark.parametrize("body, words", [
    ({"messages": ASK, "options": {"mirostat": 2}}, "mirostat"),
    ({"messages": ASK, "think": True}, "think"),
    ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
    ({"messages": ASK, "format": "yaml"}, "format"),
    ({"messages": ASK, "bogus": 1}, "bogus"),
    ({"messages": ASK, "options": {"temperature": 9}}, "temperature"),
])
def test_bad_chat_requests_are_400_in_ollamas_shape(server, body, words):
    response = requests.post(server.url + "/api/chat", json={"model": "chatglm2-6b", **body}, timeout=10)
    assert response.status_code == 400 and words in response.json()["error"]
    assert set(response.json()) == {"error"}


def test_setup_options_are_accepted(client):
    result = client.chat(model="chatglm2-6b", messages=ASK, keep_alive="5m",
                         options={"num_ctx": 4096, "num_thread": 2, "num_predict": 2, "temperature": 0})
    assert result.eval_count == 2


def test_the_api_key_covers_ollamas_routes(serve, engine, ollama_for):
    server = serve(engine, api_key="sekret")
    assert requests.get(server.url + "/api/tags", timeout=10).status_code == 401
    client = ollama_for(server, headers={"Authorization": "Bearer sekret"})
    assert client.list().models


def test_a_client_that_leaves_stops_its_ollama_job(serve, engine_for, slow_model):
    import socket
    import time

    server = serve(engine_for(slow_model))
    body = json.dumps({"model": "x", "messages": ASK, "stream": False, "options": {"num_predict": 200}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 10
    while not server.engine.running_ids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.running_ids
    sock.close()
    deadline = time.monotonic() + 5
    while server.engine.running_ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.engine.running_ids

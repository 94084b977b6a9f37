"""Bad input gets a 4xx JSON answer that says what is wrong, and the server keeps serving."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SEED_ROUTES = ["/stream", "/generate", "/tokenize", "/interrupt", "/ui/render"]


def assert_seed_error(r, status, *words):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["success"] is False and isinstance(body["message"], str) and body["message"]
    for word in words:
        assert word in body["message"], body["message"]
    return body


@pytest.mark.parametrize("body, words", [
    ({}, ["'query' is required"]),
    ({"query": ""}, ["'query' must not be empty"]),
    ({"query": "   "}, ["'query' must not be empty"]),
    ({"query": 5}, ["'query' must be a string"]),
    ({"query": ["a"]}, ["'query' must be a string"]),
    ({"query": "hi", "history": "nope"}, ["'history' must be a JSON list"]),
    ({"query": "hi", "history": {"a": 1}}, ["'history' must be a list"]),
    ({"query": "hi", "history": [["only one"]]}, ["'history[0]' must be a pair of two strings"]),
    ({"query": "hi", "history": [["q", 3]]}, ["'history[0]'"]),
    ({"query": "hi", "history": [["q", "a"], "x"]}, ["'history[1]'"]),
    ({"query": "hi", "max_length": 0}, ["'max_length' must be > 0"]),
    ({"query": "hi", "max_length": -5}, ["'max_length' must be > 0"]),
    ({"query": "hi", "max_length": "many"}, ["'max_length' must be a number"]),
    ({"query": "hi", "max_length": 10.5}, ["'max_length' must be a whole number"]),
    ({"query": "hi", "max_length": True}, ["'max_length' must be a number"]),
    ({"query": "hi", "top_p": 0}, ["'top_p' must be > 0 and <= 1"]),
    ({"query": "hi", "top_p": 1.5}, ["'top_p' must be > 0 and <= 1"]),
    ({"query": "hi", "top_p": "abc"}, ["'top_p' must be a number"]),
    ({"query": "hi", "temperature": -0.1}, ["'temperature' must be >= 0"]),
    ({"query": "hi", "temperature": 1e9}, ["'temperature' must be >= 0 and <= 2.0"]),
    ({"query": "hi", "temperature": None, "answer_prefix": 7}, ["'answer_prefix' must be a string"]),
])
@pytest.mark.parametrize("route", ["/stream", "/generate"])
def test_invalid_chat_fields(server, route, body, words):
    assert_seed_error(requests.post(server.url + route, json=body), 400, *words)


@pytest.mark.parametrize("data, content_type, status, words", [
    (b"{not json", "application/json", 400, ["not valid JSON"]),
    (b"", "application/json", 400, ["body is empty"]),
    (b"[1, 2]", "application/json", 400, ["must be a JSON object"]),
    (b'"text"', "application/json", 400, ["must be a JSON object"]),
    (b"query=hi", "application/x-www-form-urlencoded", 415, ["Content-Type: application/json"]),
    (b"\xff\xfe\x00", "application/json", 400, ["not valid JSON"]),
])
@pytest.mark.parametrize("route", ["/stream", "/tokenize"])
def test_malformed_bodies(server, route, data, content_type, status, words):
    r = requests.post(server.url + route, data=data, headers={"Content-Type": content_type})
    assert_seed_error(r, status, *words)


def test_json_sent_as_text_plain_is_accepted(server):
    """What a browser's fetch sends for a string body without headers (no CORS preflight needed)."""
    r = requests.post(server.url + "/tokenize", data=json.dumps({"text": "hi"}), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json()["len"] >= 1


def test_render_needs_text(server):
    assert_seed_error(requests.post(server.url + "/ui/render", json={}), 400, "'text' is required")
    r = requests.post(server.url + "/ui/render", json={"text": "**b** <script>x</script>"})
    assert r.json() == {"html": "<p><strong>b</strong> &lt;script&gt;x&lt;/script&gt;</p>\n"}


def test_tokenize_needs_text(server):
    assert_seed_error(requests.post(server.url + "/tokenize", json={}), 400, "'text' is required")
    assert_seed_error(requests.post(server.url + "/tokenize", json={"text": 1}), 400, "'text' must be a string")
    assert_seed_error(requests.post(server.url + "/tokenize", json={"text": "a", "return_tokens": "maybe"}), 400,
                      "'return_tokens' must be true or false")


def test_unknown_route_and_wrong_method(server):
    body = assert_seed_error(requests.get(server.url + "/nothing"), 404, "/nothing")
    assert "docs/api.md" in body["message"]
    r = requests.get(server.url + "/stream")
    assert_seed_error(r, 405, "GET is not allowed", "POST")
    assert "POST" in r.headers["Allow"]
    assert_seed_error(requests.delete(server.url + "/"), 405)


def test_body_over_the_size_limit(serve, engine):
    server = serve(engine, max_body_bytes=1000)
    r = requests.post(server.url + "/stream", json={"query": "x" * 5000})
    assert_seed_error(r, 413, "too large", "--max-body-bytes")
    assert requests.get(server.url + "/").status_code == 200


def test_query_that_cannot_fit_gives_the_counts(server):
    r = requests.post(server.url + "/stream", json={"query": "hello world " * 200})
    body = assert_seed_error(r, 413, "tokens", "shorten")
    assert body["prompt_tokens"] > body["limit"] and body["max_context"] == 256


def test_interrupt_body_must_be_json_when_present(server):
    assert_seed_error(requests.post(server.url + "/interrupt", data=b"{bad", headers={"Content-Type": "application/json"}),
                      400, "not valid JSON")
    assert_seed_error(requests.post(server.url + "/interrupt", json={"id": 5}), 400, "'id' must be a string")
    assert requests.post(server.url + "/interrupt").json() == {"message": "OK", "success": True}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    # the extremes: huge integers, infinities and NaN (Python's JSON reads them), lone surrogates, tiny floats
    | st.integers(-2**80, 2**80) | st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e-300, 1e-40])
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
chat_like = st.fixed_dictionaries({}, optional={
    "query": json_values, "history": json_values, "max_length": json_values | st.sampled_from(["0", "8", "-1"]),
    "top_p": json_values, "temperature": json_values, "answer_prefix": json_values, "stream": json_values,
    "text": json_values, "return_tokens": json_values, "id": json_values,
})
openai_like = st.fixed_dictionaries({"max_tokens": st.just(4)}, optional={
    "messages": json_values | st.lists(st.fixed_dictionaries({"role": json_values | st.sampled_from(
        ["user", "assistant", "system"]), "content": json_values}), max_size=3),
    "temperature": json_values, "top_p": json_values, "seed": json_values, "stop": json_values,
    "stream": json_values, "n": json_values, "model": json_values,
})


def encoded(body) -> bytes:
    """JSON as a client could send it: surrogates escaped (\\ud800), infinities as Infinity."""
    return json.dumps(body).encode()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(SEED_ROUTES + ["/v1/chat/completions"]), body=json_values | chat_like | openai_like,
       nesting=st.sampled_from([0, 0, 0, 5000]))
def test_random_json_never_breaks_the_server(server, route, body, nesting):
    if isinstance(body, dict) and "max_length" in body and route in ("/stream", "/generate"):
        body["max_length"] = 4  # valid requests stay short: this test is about bad ones
    data = encoded(body)
    if nesting and isinstance(body, dict):  # a field whose value is thousands of nested lists
        data = encoded({**body, "history": None}).replace(b'"history": null',
                                                          b'"history": ' + b"[" * nesting + b"]" * nesting)
    r = requests.post(server.url + route, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code < 500, r.text
    assert r.headers["Content-Type"].startswith(("application/json", "text/event-stream"))
    if r.status_code >= 400:
        answer = r.json()
        message = answer["error"]["message"] if route.startswith("/v1/") else answer["message"]
        assert message and len(message) < 400
    else:
        assert r.content  # a valid request streams to its end
    assert requests.get(server.url + "/", timeout=5).status_code == 200


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.text(max_size=40) | st.sampled_from(["[" * 3000 + "]" * 3000, '[["\\ud800", "a"]]', "[1e999]"]),
       query=st.text(max_size=10))
def test_random_get_generate_never_breaks_the_server(server, history, query):
    r = requests.get(server.url + "/generate", params={"query": query or "hi", "history": history,
                                                       "max_length": 4}, timeout=30)
    assert r.status_code < 500 and r.headers["Content-Type"].startswith(("application/json", "text/event-stream"))


DEEP = b"[" * 10_000 + b"]" * 10_000
POST_ROUTES = ["/stream", "/generate", "/tokenize", "/interrupt", "/ui/render", "/v1/chat/completions"]


@pytest.mark.parametrize("route", POST_ROUTES)
def test_absurdly_nested_json_is_a_400_that_says_so(server, route):
    r = requests.post(server.url + route, data=b'{"query": ' + DEEP + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.text, r.text
    assert r.headers["Content-Type"].startswith("application/json")


def test_absurdly_nested_history_in_a_get_is_a_400(server):
    r = requests.get(server.url + "/generate", params={"query": "hi", "history": DEEP.decode()})
    assert_seed_error(r, 400, "nested too deeply")


@pytest.mark.parametrize("route, body", [
    ("/stream", '{"query": "\\ud800"}'),
    ("/stream", '{"query": "hi", "answer_prefix": "x\\udfff"}'),
    ("/generate", '{"query": "hi", "history": [["\\ud800", "a"]]}'),
    ("/tokenize", '{"text": "\\udc00"}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
])
def test_lone_surrogates_are_refused_as_not_unicode_text(server, route, body):
    r = requests.post(server.url + route, data=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode text" in r.text, r.text


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_tiny_temperature_is_greedy_not_an_error(server, temperature):
    ask = {"query": "你好", "max_length": 40}
    tiny = requests.post(server.url + "/generate", json={**ask, "temperature": temperature, "stream": False})
    greedy = requests.post(server.url + "/generate", json={**ask, "temperature": 0, "stream": False})
    assert tiny.status_code == greedy.status_code == 200 and tiny.content == greedy.content


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**400])
def test_seed_out_of_range_is_a_400(server, seed):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                 "seed": seed, "max_tokens": 4})
    assert r.status_code == 400 and "'seed'" in r.json()["error"]["message"], r.text


def test_error_messages_quote_bad_values_short(server):
    r = requests.post(server.url + "/stream", json={"query": "hi", "max_length": "x" * 100_000})
    body = assert_seed_error(r, 400, "'max_length' must be a number")
    assert len(body["message"]) < 200
    r = requests.post(server.url + "/generate", json={"query": "hi", "max_length": 10**400, "stream": False})
    assert r.status_code == 200  # a huge whole number is clamped to the context budget, as documented

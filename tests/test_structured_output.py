"""Structured output: every reply under a schema parses and validates, whatever the (random) model samples."""

import json
import re

import jsonschema
import openai
import pydantic
import pytest
import requests

from server.engine.budget import GenerationRequest
from server.engine.grammar import json_schema_grammar, lark_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "admin": {"type": "boolean"},
        "role": {"enum": ["user", "editor", "owner"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 6},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "admin", "role", "age", "address"],
    "additionalProperties": False,
}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def schema_format(schema, name="person"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_every_sampled_reply_validates_against_the_schema(client):
    for seed in range(12):
        result = client.chat.completions.create(model="chatglm2-6b", max_tokens=220, seed=seed, temperature=1.3,
                                                messages=[{"role": "user", "content": "给我一个用户"}],
                                                response_format=schema_format(PERSON))
        choice = result.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_sdk_parse_with_a_pydantic_model(client):
    class Answer(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=10)
        sunny: bool
        level: int = pydantic.Field(ge=0, le=10)  # (an unbounded number lets a random model write digits forever)

    for seed in range(4):
        result = client.chat.completions.parse(model="chatglm2-6b", seed=seed, max_tokens=120, response_format=Answer,
                                               messages=[{"role": "user", "content": "天气如何？"}])
        parsed = result.choices[0].message.parsed
        assert isinstance(parsed, Answer) and isinstance(parsed.sunny, bool)


def test_json_object_gives_an_object_or_says_length(client):
    for seed in range(6):
        result = client.chat.completions.create(model="chatglm2-6b", max_tokens=120, seed=seed,
                                                messages=[{"role": "user", "content": "json please"}],
                                                response_format={"type": "json_object"})
        choice = result.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: then it is not valid JSON, as OpenAI behaves
            assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith("{")


def test_a_reply_cut_by_max_tokens_says_length(client):
    result = client.chat.completions.create(model="chatglm2-6b", max_tokens=3, seed=1,
                                            messages=[{"role": "user", "content": "x"}],
                                            response_format=schema_format(PERSON))
    assert result.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.choices[0].message.content)


def test_the_answer_prefix_begins_the_structured_reply(client):
    prefix = '{"name": "Li'
    result = client.chat.completions.create(model="chatglm2-6b", max_tokens=150, seed=3, messages=[
        {"role": "user", "content": "用户？"}, {"role": "assistant", "content": prefix}],
        response_format=schema_format(PERSON))
    jsonschema.validate(json.loads(prefix + result.choices[0].message.content), PERSON)
    with pytest.raises(openai.BadRequestError, match="answer prefix"):
        client.chat.completions.create(model="chatglm2-6b", max_tokens=5, messages=[
            {"role": "user", "content": "用户？"}, {"role": "assistant", "content": "[1, 2"}],
            response_format=schema_format(PERSON))


def test_rows_in_one_batch_follow_their_own_schemas(engine_for, slow_model):
    engine = engine_for(slow_model, max_batch=4, prompt_cache_mb=0)
    schemas = [PERSON, {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4}, None,
               {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 500}}, "required": ["n"],
                "additionalProperties": False}]
    jobs = [engine.submit(GenerationRequest(query=f"q{i}", max_new_tokens=150, seed=i, temperature=1.0,
                                            grammar=None if s is None else json_schema_grammar(s)))
            for i, s in enumerate(schemas)]
    results = [job.wait() for job in jobs]
    for schema, finished in zip(schemas, results):
        if schema is not None:
            assert finished.finish_reason == "stop", finished.text
            jsonschema.validate(json.loads(finished.text), schema)


def test_at_temperature_zero_a_grammar_the_reply_already_fits_changes_nothing(engine, server):
    free = engine.submit(GenerationRequest(query="hello", max_new_tokens=30, temperature=0)).wait()
    absent = next(c for c in "{}[]@#~" if c not in free.generated)
    grammar = lark_grammar(f"start: /[^{re.escape(absent)}]*/")  # bans every id holding `absent`
    constrained = engine.submit(GenerationRequest(query="hello", max_new_tokens=30, temperature=0,
                                                  grammar=grammar)).wait()
    assert constrained.generated == free.generated
    banned = engine.submit(GenerationRequest(query="hello", max_new_tokens=30, temperature=0,
                                             grammar=lark_grammar(f"start: /[^{re.escape(free.generated[1])}]*/")))
    assert free.generated[1] not in banned.wait().generated  # the same mechanism does act


def test_stream_and_generate_take_response_format(server):
    body = {"query": "用户", "max_length": 250, "temperature": 0.9, "response_format": schema_format(PERSON)}
    events = requests.post(server.url + "/stream", json=body).content.decode().split("\n\n")
    replies = [json.loads(e[6:])[0] for e in events if e.startswith("data: [")]
    jsonschema.validate(json.loads(replies[-1]), PERSON)
    r = requests.get(server.url + "/generate", params={**body, "response_format": json.dumps(body["response_format"])})
    assert r.headers["X-Finish-Reason"] == "stop"
    jsonschema.validate(json.loads(r.text), PERSON)


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "if": {"required": ["a"]}, "then": {}}, "if"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
])
def test_a_schema_the_engine_cannot_follow_is_400_naming_the_construct(client, schema, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chatglm2-6b", messages=[{"role": "user", "content": "x"}],
                                       response_format=schema_format(schema))
    assert words in caught.value.body["message"] and caught.value.body["code"] == "invalid_schema"


def test_bad_response_format_shapes_are_400(server):
    for value in ({"type": "yaml"}, "json", {"type": "json_schema", "json_schema": {"schema": [1]}}):
        r = requests.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "response_format": value})
        assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]


def test_a_front_end_refuses_structured_output_by_name(serve, front_for, engine):
    front = serve(front_for(engine))
    r = requests.post(front.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]


def bounded_schemas():
    """JSON Schemas whose every valid value is short: enums, booleans, bounded strings and integers, nesting."""
    from hypothesis import strategies as st

    leaf = st.one_of(
        st.just({"type": "boolean"}),
        st.lists(st.sampled_from(["a", "是", "x y", "null"]), min_size=1, max_size=3, unique=True).map(
            lambda values: {"enum": values}),
        st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
        st.tuples(st.integers(-50, 0), st.integers(0, 50)).map(
            lambda b: {"type": "integer", "minimum": b[0], "maximum": b[1]}),
    )

    def objects(children):
        names = st.sampled_from(["k", "名字", "on", "v2"])
        return st.dictionaries(names, children, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False})

    return st.recursive(leaf, lambda children: st.one_of(
        objects(children), children.map(lambda item: {"type": "array", "items": item, "maxItems": 2})), max_leaves=5)


def test_generated_schemas_always_validate(engine):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(schema=bounded_schemas(), seed=st.integers(0, 2**31))
    def check(schema, seed):
        finished = engine.submit(GenerationRequest(query="json", max_new_tokens=200, seed=seed, temperature=1.2,
                                                   grammar=json_schema_grammar(schema))).wait()
        assert finished.finish_reason == "stop", finished.text
        jsonschema.validate(json.loads(finished.text), schema)

    check()

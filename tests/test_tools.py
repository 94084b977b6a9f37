"""Tool calling on a model that was not trained for it: the tools in the prompt, the call under a grammar."""

import json

import jsonschema
import openai
import pydantic
import pytest

from server.web.messages import to_rounds

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "天气 / the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "now", "description": "the time", "parameters": {"type": "object", "properties": {},
                                                           "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "now": CLOCK["function"]["parameters"]}
ASK = [{"role": "user", "content": "北京天气怎么样？"}]


@pytest.fixture(scope="module")
def long_model(tiny_checkpoint):
    """The tiny model with room for the tool descriptions (the tiny tokenizer spells Chinese byte by byte)."""
    from server.model.loader import load_model
    from tests.conftest import cpu_plan

    return load_model(tiny_checkpoint, cpu_plan(max_context=2048))


@pytest.fixture
def server(serve, engine_for, long_model):
    return serve(engine_for(long_model))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def valid_calls(message) -> list[str]:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in message.tool_calls]


def test_required_always_calls_a_tool_with_valid_arguments(client):
    for seed in range(6):
        result = client.chat.completions.create(model="chatglm2-6b", messages=ASK, tools=[WEATHER, CLOCK],
                                                tool_choice="required", seed=seed, max_tokens=200, temperature=1.2)
        assert result.choices[0].finish_reason == "tool_calls"
        assert set(valid_calls(result.choices[0].message)) <= {"get_weather", "now"}


def test_a_named_tool_is_the_one_called_once(client):
    for seed in range(4):
        result = client.chat.completions.create(
            model="chatglm2-6b", messages=ASK, tools=[WEATHER, CLOCK], seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "now"}})
        assert valid_calls(result.choices[0].message) == ["now"]


def test_auto_lets_the_model_answer_in_words_or_call(client):
    kinds = set()
    for seed in range(10):
        result = client.chat.completions.create(model="chatglm2-6b", messages=ASK, tools=[WEATHER], seed=seed,
                                                max_tokens=200, temperature=1.5)
        choice = result.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and valid_calls(choice.message) == ["get_weather"] * len(
                choice.message.tool_calls)
            kinds.add("call")
        else:
            assert choice.message.content and not choice.message.content.startswith("{")
            kinds.add("words")
    assert kinds  # (which ones a random model picks is up to it; each kind that came is well formed)


def test_a_two_turn_round_trip(client):
    first = client.chat.completions.create(model="chatglm2-6b", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=200, seed=2)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "晴，25°C"}]
    assert messages[1]["role"] == "assistant" and "content" not in messages[1]
    second = client.chat.completions.create(model="chatglm2-6b", messages=messages, tools=[WEATHER],
                                            tool_choice="none", max_tokens=20, seed=2)
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None


def test_streamed_tool_calls_follow_openais_deltas(client):
    kwargs = dict(model="chatglm2-6b", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                  max_tokens=200, seed=5, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0].tool_calls[0]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name and first.function.arguments == ""
    arguments = "".join(d.tool_calls[0].function.arguments or "" for d in deltas if d.tool_calls[0].index == 0)
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the SDK's own accumulator puts the deltas back together
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert valid_calls(final.choices[0].message)


def test_the_agent_loop_maps_onto_rounds():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "天气？"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"北京\", \"unit\": \"c\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "晴"}]
    query, history, prefix = to_rounds(messages, "TOOLS")
    assert history == [("be brief\n\nTOOLS\n\n天气？", '{"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}')]
    assert query == "工具 get_weather 的结果 / Result of tool get_weather:\n晴" and prefix == ""


@pytest.mark.parametrize("kwargs, words", [
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}]},
     "if"),
])
def test_bad_tool_requests_are_400(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chatglm2-6b", messages=ASK, **kwargs)
    assert words in caught.value.body["message"]


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="chatglm2-6b", max_tokens=200, seed=1,
                     max_retries=0)

    class City(pydantic.BaseModel):
        """A city."""
        name: str = pydantic.Field(max_length=8)
        capital: bool

    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("北京天气？")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(called.tool_calls[0]["args"], SCHEMAS["get_weather"])
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("一个城市")
        assert isinstance(city, City), method


def test_objects_that_list_their_properties_are_closed():
    """A schema that does not say `additionalProperties` gets no invented keys (LangChain's function_calling
    schemas say nothing); names that are keywords stay names, literals stay as written."""
    from server.engine.grammar import closed

    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "kind": {"enum": [{"properties": {}}]}},
              "$defs": {"properties": {"type": "object", "properties": {}}}}
    assert closed(schema) == {
        "type": "object", "additionalProperties": False,
        "properties": {"properties": {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
                       "kind": {"enum": [{"properties": {}}]}},
        "$defs": {"properties": {"type": "object", "properties": {}, "additionalProperties": False}}}
    open_schema = {"type": "object", "properties": {"a": {}}, "additionalProperties": True}
    assert closed(open_schema) == open_schema

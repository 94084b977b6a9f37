"""ChatGLM3's native tools: its system message, tool_call(...) blocks and observations, through the real server."""

import json

import openai
import pytest

from server.model.family import CHATGLM3
from server.model.tokenizer import ChatGLM2Tokenizer
from server.model.tool_prompt import ChatGLM3Tools, call_arguments
from server.web.messages import to_chat
from server.web.tool_calls import tool_use
from tests.checkpoint_factory import write_checkpoint
from tests.conftest import REAL_TOKENIZER, cpu_plan
from tests.test_family import ASSISTANT, GMASK, OBSERVATION, SOP, SYSTEM, USER, chatglm3_files
from tests.test_tools import CLOCK, WEATHER

# The reference demo's tools: {name, description, parameters}, written as json.dumps(tools, indent=4,
# ensure_ascii=False) after this sentence and a newline, in one system message.
REFERENCE_INTRO = "Answer the following questions as best as you can. You have access to the following tools:"
REFERENCE_TOOLS_TEXT = REFERENCE_INTRO + "\n" + """[
    {
        "name": "get_weather",
        "description": "天气 / the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {
                    "type": "string",
                    "maxLength": 6
                },
                "unit": {
                    "enum": [
                        "c",
                        "f"
                    ]
                }
            },
            "required": [
                "city",
                "unit"
            ],
            "additionalProperties": false
        }
    }
]"""
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": "{\"city\": \"北京\", \"unit\": \"c\"}"}}


def prompt_ids(tok, messages, tools=None):
    use = tool_use({"tools": tools}, CHATGLM3) if tools else None
    system, query, history, prefix = to_chat(messages, use.instructions if use else "",
                                             use.format if use else ChatGLM3Tools())
    return tok.build_prompt(query, history, prefix, system)


@pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="the real tokenizer (../shared/chatglm2) is not here")
def test_tools_calls_and_observations_follow_the_reference_format():
    """Expected ids written from ChatGLM3's published format: build_single_message(role, metadata, text) is
    the role id, encode(f"{metadata}\\n") and encode(text); a call's metadata is the tool's name and its text
    the ```python block; a result is an observation message; the prompt ends with <|assistant|>."""
    tok = ChatGLM2Tokenizer(REAL_TOKENIZER, family=CHATGLM3)
    sp = tok.sp

    def message(role_id, text, metadata=""):
        return [role_id] + sp.encode(f"{metadata}\n") + sp.encode(text)

    ask = [{"role": "user", "content": "北京天气怎么样？"}]
    tools_system = message(SYSTEM, REFERENCE_TOOLS_TEXT)
    first = [GMASK, SOP] + tools_system + message(USER, "北京天气怎么样？")
    assert prompt_ids(tok, ask, [WEATHER]) == first + [ASSISTANT]

    call_block = "```python\ntool_call(city='北京', unit='c')\n```"
    loop = ask + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "晴，25°C"}]
    after_call = first + message(ASSISTANT, call_block, "get_weather") + message(OBSERVATION, "晴，25°C")
    assert prompt_ids(tok, loop, [WEATHER]) == after_call + [ASSISTANT]

    answered = loop + [{"role": "assistant", "content": "北京今天晴。"}, {"role": "user", "content": "明天呢？"}]
    assert prompt_ids(tok, answered, [WEATHER]) == after_call + message(ASSISTANT, "北京今天晴。") + \
        message(USER, "明天呢？") + [ASSISTANT]

    # a request's own system message follows the tools' one, as a message of its own
    with_system = [{"role": "system", "content": "简洁回答。"}] + ask
    assert prompt_ids(tok, with_system, [WEATHER]) == [GMASK, SOP] + tools_system + message(SYSTEM, "简洁回答。") + \
        message(USER, "北京天气怎么样？") + [ASSISTANT]
    # spelled out for an engine that takes text (the export's tokenizer.json reads the role tokens back)
    text = tok.prompt_text(*reversed_chat(loop, [WEATHER]))
    assert text.endswith("<|assistant|>get_weather\n " + call_block + "<|observation|>\n 晴，25°C<|assistant|>")


def reversed_chat(messages, tools):
    use = tool_use({"tools": tools}, CHATGLM3)
    system, query, history, prefix = to_chat(messages, use.instructions, use.format)
    return query, history, prefix, system


def test_calls_are_read_with_ast_and_never_run(tmp_path):
    reader = ChatGLM3Tools(("get_weather", "now"))
    assert reader.read_calls("get_weather\n```python\ntool_call(city='北京', unit=\"c\", days=3, hot=True)\n```") == \
        [{"name": "get_weather", "arguments": {"city": "北京", "unit": "c", "days": 3, "hot": True}}]
    assert reader.read_calls("now\n ```python\ntool_call()\n```") == [{"name": "now", "arguments": {}}]
    marker = tmp_path / "ran"
    for code in (f"tool_call(city=open({str(marker)!r}, 'w'))", "tool_call('北京')", "os.system('x')",
                 "tool_call(**{'a': 1})", "tool_call(city=__import__('os'))"):
        assert call_arguments(code) is None
        assert reader.read_calls(f"get_weather\n```python\n{code}\n```") == []
    assert not marker.exists()
    assert reader.read_calls("get_weather\n```python\ntool_call(city='北") == []  # not complete yet
    assert reader.read_calls("天气不错\n```python\ntool_call()\n```") == []  # not a tool's name: words
    assert reader.decided("get_wea") is None and reader.decided("你好") is False
    assert reader.decided("get_weather\n") is True and reader.decided("\n你好") is False


@pytest.fixture(scope="module")
def glm3_model(tmp_path_factory):
    from server.model.loader import load_model

    folder = chatglm3_files(write_checkpoint(tmp_path_factory.mktemp("glm3-tools")), "generation_config")
    return load_model(folder, cpu_plan(max_context=2048))


@pytest.fixture
def client(serve, engine_for, glm3_model):
    server = serve(engine_for(glm3_model), repo="THUDM/chatglm3-6b")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_required_and_named_calls_come_back_as_openai_tool_calls(client):
    for seed in range(4):
        result = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "天气"}],
                                                tools=[WEATHER, CLOCK], tool_choice="required", seed=seed,
                                                max_tokens=120, temperature=1.2)
        choice = result.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "now")
        # the grammar holds the schema: both required keys once, in order, of their types; no keys for `now`
        assert (set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f") and len(arguments["city"]) <= 6
                if call.function.name == "get_weather" else arguments == {})
    named = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "几点"}],
                                           tools=[WEATHER, CLOCK], max_tokens=60, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "now"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["now"]


def test_a_streamed_call_and_the_next_turn(client):
    kwargs = dict(model="chatglm3-6b", messages=[{"role": "user", "content": "天气"}], tools=[WEATHER],
                  tool_choice="required", max_tokens=120, seed=3, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == \
        whole.choices[0].message.tool_calls[0].function.arguments
    call = whole.choices[0].message.tool_calls[0]
    messages = kwargs["messages"] + [whole.choices[0].message.model_dump(exclude_none=True),
                                     {"role": "tool", "tool_call_id": call.id, "content": "晴"}]
    second = client.chat.completions.create(model="chatglm3-6b", messages=messages, tools=[WEATHER],
                                            tool_choice="none", max_tokens=10, seed=3)
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason in ("stop", "length")


def test_auto_gives_words_or_a_well_formed_call(client):
    for seed in range(6):
        result = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "你好"}],
                                                tools=[WEATHER], seed=seed, max_tokens=40, temperature=1.5)
        message = result.choices[0].message
        if message.tool_calls:
            assert result.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name == \
                "get_weather"
        else:  # words: the empty metadata line is not part of the content
            assert message.content is not None and not message.content.startswith("\n")


def test_ollama_reports_a_chatglm3_call_in_its_shape():
    from server.engine import Finished
    from server.web.ollama_api import ChatShape

    tools = tool_use({"tools": [WEATHER]}, CHATGLM3)
    reply = "get_weather\n```python\ntool_call(city='北京', unit='c')\n```"
    finished = Finished(finish_reason="stop", text=reply, generated=" " + reply, prompt_tokens=5,
                        completion_tokens=9, dropped_rounds=0, seconds=1.0, first_token_seconds=0.5)
    expected = [{"function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}}]
    assert ChatShape(tools).whole(finished)["message"]["tool_calls"] == expected
    assert [d["message"].get("tool_calls") for d in ChatShape(tools).deltas(finished)] == [expected]

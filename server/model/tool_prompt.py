"""How tools reach ChatGLM2's prompt and how its calls are read back: the one place that knows the format.

ChatGLM2 was not trained for tools, so the tools are described in words (Chinese, then English) ahead of the
first question, and a call is one JSON object per line, `{"name": …, "arguments": {…}}`, which the engine's
grammar (engine/grammar.py, tool_call_grammar) enforces. Earlier calls and their results go back into the
history in the same words. A model with its own tool format (ChatGLM3) gets its own functions here.
"""

from __future__ import annotations

import json

INTRO = ("你可以调用下面的工具。需要调用时，只输出一行 JSON：{\"name\": 工具名, \"arguments\": {参数}}；"
         "不需要时直接用文字回答。\n"
         "You can call the tools below. To call one, answer with only one line of JSON: "
         "{\"name\": tool name, \"arguments\": {arguments}}; otherwise answer in words.")
MUST_CALL = "这次必须调用工具。 / This time you must call a tool."


def tool_instructions(tools: list[dict], must_call: bool) -> str:
    """The words that describe `tools` (OpenAI function definitions) to the model."""
    lines = [INTRO]
    for tool in tools:
        entry = {"name": tool["name"], "description": tool.get("description", ""),
                 "parameters": tool.get("parameters") or {"type": "object"}}
        lines.append(json.dumps(entry, ensure_ascii=False))
    if must_call:
        lines.append(MUST_CALL)
    return "\n".join(lines)


def calls_text(calls: list[dict]) -> str:
    """An assistant turn that called tools, as the model would have written it."""
    return "\n".join(json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                     for c in calls)


def result_text(name: str, content: str) -> str:
    """A tool's result, as a user turn."""
    return f"工具 {name} 的结果 / Result of tool {name}:\n{content}"


def read_calls(text: str) -> tuple[list[dict], str]:
    """The complete calls at the start of `text` ({"name", "arguments"} dicts, in order) and what follows them."""
    decoder = json.JSONDecoder()
    calls, rest = [], text.lstrip()
    while rest.startswith("{"):
        try:
            value, end = decoder.raw_decode(rest)
        except ValueError:  # not complete yet (or cut by max_tokens)
            break
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
            break
        calls.append({"name": value["name"], "arguments": value.get("arguments", {})})
        rest = rest[end:].lstrip()
    return calls, rest

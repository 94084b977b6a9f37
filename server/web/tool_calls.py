"""OpenAI's tools: `tools`/`tool_choice`/`parallel_tool_calls` -> the model's tool prompt and a grammar, and
the reply read back as `tool_calls` (whole, or streamed as OpenAI's deltas).

The prompt side (how each model family writes tools, calls and results) is model/tool_prompt.py; this module is
the OpenAI shape around it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..engine.grammar import chatglm3_call_grammar, tool_call_grammar
from ..model.family import CHATGLM2, CHATGLM3
from ..model.tool_prompt import GenericTools, tool_format
from .messages import to_chat
from .validation import ApiError, flag, shown


@dataclass(frozen=True)
class ToolUse:
    instructions: str  # what the prompt says about the tools
    grammar: str  # what the reply must follow
    format: object  # the model's tool format (model/tool_prompt.py): how turns are written and calls read


def chat_with_tools(messages, tool_fields: dict, family: str) -> tuple[ToolUse | None, tuple]:
    """The request's tools (`tool_fields`: tools, tool_choice, parallel_tool_calls) in `family`'s format, and
    its messages as (system, query, history, answer_prefix), with the tools' turns in that format too."""
    tools = tool_use(tool_fields, family)
    return tools, to_chat(messages, tools.instructions if tools else "", tools.format if tools else tool_format(family))


def tool_use(body: dict, family: str = CHATGLM2) -> ToolUse | None:
    """The request's tools in `family`'s format, or None when it has none or tool_choice is "none" (then it is
    a plain chat)."""
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {…}}",
                       param="tools")
    functions = [function_of(tool, i) for i, tool in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ApiError(400, "'tools' names a function twice", param="tools")
    choice = body.get("tool_choice", "auto")
    parallel = flag(body, "parallel_tool_calls", True)
    if choice == "none":
        return None
    if choice in ("auto", "required"):
        required = choice == "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ApiError(400, f"'tool_choice' names {shown(name)}, which is not in 'tools'", param="tool_choice")
        functions, required, parallel = [f for f in functions if f["name"] == name], True, False
    else:
        raise ApiError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": …}}", param="tool_choice")
    fmt = tool_format(family, tuple(f["name"] for f in functions))
    grammar = chatglm3_call_grammar(functions, required) if family == CHATGLM3 else \
        tool_call_grammar(functions, required=required, parallel=parallel)
    return ToolUse(instructions=fmt.instructions(functions, must_call=required), grammar=grammar, format=fmt)


def function_of(tool, i: int) -> dict:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ApiError(400, f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": …, "
                            f"\"parameters\": {{…}}}}}}", param="tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(400, f"'tools[{i}].function.parameters' must be a JSON Schema object", param="tools")
    return {"name": function["name"], "description": function.get("description") or "",
            "parameters": parameters}


def openai_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def reply_message(content: str, fmt=GenericTools) -> tuple[dict, bool]:
    """The assistant message of a tools request and whether it called tools (then content is null)."""
    calls = fmt.read_calls(content)
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": openai_calls(calls)}, True
    return {"role": "assistant", "content": content}, False


class StreamedCalls:
    """Turns a growing tools reply into OpenAI's deltas: words as content, each call once it is complete (a
    first delta with its id and name, then its arguments)."""

    def __init__(self, fmt=GenericTools):
        self.fmt = fmt
        self.sent_calls = 0
        self.words = None  # True once the reply is words, False once it is calls

    def deltas(self, text: str) -> list[dict]:
        if self.words is None:
            calls = self.fmt.decided(text)
            if calls is None:
                return []
            self.words = not calls
        if self.words:
            return [{"content_upto": text}]
        calls = self.fmt.read_calls(text)
        out = []
        for index, call in enumerate(openai_calls(calls[self.sent_calls:]), start=self.sent_calls):
            arguments = call["function"]["arguments"]
            out.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        self.sent_calls = len(calls)
        return out

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

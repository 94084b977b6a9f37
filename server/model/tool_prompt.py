"""How tools reach a model's prompt and how its calls are read back: the one place that knows each format.

ChatGLM2 (`GenericTools`) was not trained for tools, so the tools are described in words (Chinese, then English)
ahead of the first question, and a call is one JSON object per line, `{"name": …, "arguments": {…}}`, which the
engine's grammar (engine/grammar.py, tool_call_grammar) enforces. Earlier calls and their results go back into
the history in the same words.

ChatGLM3 (`ChatGLM3Tools`) has its own format, as its reference demo builds it: a system message "Answer the
following questions as best as you can. You have access to the following tools:" followed by the tools as
indented JSON; a call is an assistant message whose metadata line is the tool's name and whose text is
```python\ntool_call(key=value, ...)\n``` (read back with `ast`, never evaluated); a result is an
<|observation|> message. Those messages live inside the text of a round (the engine's history is rounds of
text) as segments: MARK role SEP metadata MARK text, which the tokenizer turns into role tokens (tokenizer.py,
chatglm3_messages). MARK is a private-use character no text a person sends contains by accident; one who types
it writes role tokens into their own prompt, which /v1/completions allows anyway.
"""

from __future__ import annotations

import ast
import json

from .family import CHATGLM3

INTRO = ("你可以调用下面的工具。需要调用时，只输出一行 JSON：{\"name\": 工具名, \"arguments\": {参数}}；"
         "不需要时直接用文字回答。\n"
         "You can call the tools below. To call one, answer with only one line of JSON: "
         "{\"name\": tool name, \"arguments\": {arguments}}; otherwise answer in words.")
MUST_CALL = "这次必须调用工具。 / This time you must call a tool."

CHATGLM3_INTRO = "Answer the following questions as best as you can. You have access to the following tools:"
MARK, SEP = "\ue000", "\ue001"


class GenericTools:
    """ChatGLM2's tools: described in words, called with JSON lines."""

    @staticmethod
    def instructions(tools: list[dict], must_call: bool) -> str:
        """The words that describe `tools` ({name, description, parameters}) to the model."""
        lines = [INTRO]
        for tool in tools:
            lines.append(json.dumps(function_entry(tool), ensure_ascii=False))
        if must_call:
            lines.append(MUST_CALL)
        return "\n".join(lines)

    @staticmethod
    def system_text(parts: list[str], instructions: str) -> str:
        return "\n\n".join([*parts, instructions] if instructions else parts)

    @staticmethod
    def calls_turn(calls: list[dict]) -> tuple[str, str]:
        """An assistant turn that called tools, as the model would have written it."""
        return "assistant", "\n".join(json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                                      for c in calls)

    @staticmethod
    def result_turn(name: str, content: str) -> tuple[str, str]:
        """A tool's result, as a user turn."""
        return "user", f"工具 {name} 的结果 / Result of tool {name}:\n{content}"

    @staticmethod
    def decided(text: str) -> bool | None:
        """Whether the reply so far is calls (True), words (False), or cannot tell yet (None)."""
        stripped = text.lstrip()
        return stripped.startswith("{") if stripped else None

    @staticmethod
    def read_calls(text: str) -> list[dict]:
        """The complete calls at the start of `text` ({"name", "arguments"} dicts, in order)."""
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
        return calls


class ChatGLM3Tools:
    """ChatGLM3's native tools: a system message with the tools, tool_call(...) blocks, observations."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names = names  # the offered tools: a reply whose first line is one of them is a call

    @staticmethod
    def instructions(tools: list[dict], must_call: bool) -> str:
        """The system message of the reference demo (must_call is the grammar's business, not the prompt's)."""
        return CHATGLM3_INTRO + "\n" + json.dumps([function_entry(t) for t in tools], indent=4, ensure_ascii=False)

    @staticmethod
    def system_text(parts: list[str], instructions: str) -> str:
        """The tools' system message first, then each system message of the request as one more (as the
        reference's OpenAI demo orders them)."""
        if not instructions:
            return "\n\n".join(parts)
        return instructions + "".join(segment("system", part) for part in parts)

    @staticmethod
    def calls_turn(calls: list[dict]) -> tuple[str, str]:
        """One assistant message per call (ChatGLM3 calls one tool at a time)."""
        return "assistant", "".join(segment("assistant", code_block(c["arguments"]), c["name"]) for c in calls)

    @staticmethod
    def result_turn(name: str, content: str) -> tuple[str, str]:
        return "assistant", segment("observation", content)  # (an assistant-side message: it needs no question)

    def decided(self, text: str) -> bool | None:
        first, newline, _ = text.lstrip(" ").partition("\n")
        if not newline:
            return None if any(name.startswith(first.strip()) for name in self.names) else False
        return first.strip() in self.names

    def read_calls(self, text: str) -> list[dict]:
        """The call in a reply `name\\n```python\\ntool_call(...)\\n```` (none while it is incomplete)."""
        first, _, body = text.lstrip(" ").partition("\n")
        if first.strip() not in self.names:
            return []
        lines = body.strip().split("\n")
        if len(lines) < 3 or not lines[0].startswith("```") or lines[-1] != "```":
            return []
        arguments = call_arguments("\n".join(lines[1:-1]))
        return [] if arguments is None else [{"name": first.strip(), "arguments": arguments}]


def function_entry(tool: dict) -> dict:
    return {"name": tool["name"], "description": tool.get("description", ""),
            "parameters": tool.get("parameters") or {"type": "object"}}


def tool_format(family: str, names: tuple[str, ...] = ()):
    return ChatGLM3Tools(names) if family == CHATGLM3 else GenericTools()


# -- ChatGLM3's messages inside a round's text -------------------------------------------------------------------
def segment(role: str, text: str, metadata: str = "") -> str:
    return f"{MARK}{role}{SEP}{metadata}{MARK}{text}"


def split_turn(role: str, text: str) -> list[tuple[str, str, str]]:
    """A turn's text as ChatGLM3 messages (role, metadata, text): the text before the first segment belongs to
    `role`; each segment is a message of its own."""
    parts = text.split(MARK)
    messages = [(role, "", parts[0])] if parts[0] or len(parts) == 1 else []
    for head, body in zip(parts[1::2], parts[2::2]):
        segment_role, _, metadata = head.partition(SEP)
        messages.append((segment_role, metadata, body))
    return messages


def ends_with_observation(text: str) -> bool:
    return bool(text) and split_turn("assistant", text)[-1][0] == "observation"


def code_block(arguments) -> str:
    """A call's arguments as ChatGLM3 writes them: ```python\\ntool_call(key=value, ...)\\n```."""
    items = arguments.items() if isinstance(arguments, dict) else []
    return "```python\ntool_call(" + ", ".join(f"{key}={python_literal(value)}" for key, value in items) + ")\n```"


def python_literal(value) -> str:
    """A JSON value in Python's literal syntax (True, None, 'text')."""
    return repr(value)


def call_arguments(code: str) -> dict | None:
    """The keyword arguments of `tool_call(...)` when they are all literals; None otherwise. Parsed, never run."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"
            and not node.args and all(k.arg for k in node.keywords)):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None

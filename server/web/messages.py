"""Chat messages (OpenAI's, and Ollama's, which share the shape) -> the engine's rounds.

System (and developer) messages become the system text (ChatGLM3's system role; for ChatGLM2, which has
none, the tokenizer puts it before the first question), user/assistant pairs
become history, and a trailing assistant message is a prefill: it becomes the answer prefix. An agent loop's
turns map onto rounds too, in the model's tool format (model/tool_prompt.py): an assistant message's tool_calls
become the calls as the model writes them, and `tool` messages its results (for ChatGLM2 a user turn, for
ChatGLM3 an observation; a conversation that ends in one goes on from it with a fresh reply).
"""

from __future__ import annotations

import json

from ..model.tokenizer import fold_system
from ..model.tool_prompt import MARK, GenericTools, ends_with_observation, segment
from .validation import ApiError


def message_text(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text can be used
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def to_rounds(messages, instructions: str = "") -> tuple[str, list[tuple[str, str]], str]:
    """(query, history, answer_prefix) with the system text leading the first question, as ChatGLM2 takes it."""
    system, query, history, prefix = to_chat(messages, instructions)
    query, history = fold_system(system, query, history)
    return query, history, prefix


def to_chat(messages, instructions: str = "", tools=GenericTools) -> tuple[str, str, list[tuple[str, str]], str]:
    """(system, query, history, answer_prefix) from OpenAI messages; `instructions` (the tools) join the system
    text as `tools` (the model's tool format) places them. The tokenizer puts the system text where the model's
    format wants it (model/tokenizer.py)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    system, turns = [], []  # turns: [role, text], consecutive same roles merged
    call_names: dict[str, str] = {}  # tool_call id -> function name, for the tool messages that answer them
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", param="messages")
        role = message["role"]
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported: use system, user, assistant or "
                                "tool", param="messages")
        if role == "assistant" and message.get("tool_calls"):
            calls = assistant_calls(message["tool_calls"], i)
            call_names.update((c["id"], c["name"]) for c in calls)
            words = message_text(message, i) if message.get("content") else ""
            _, called = tools.calls_turn(calls)
            text = words + called if called.startswith(MARK) else "\n".join(t for t in (words, called) if t)
        elif role == "tool":
            name = call_names.get(message.get("tool_call_id")) or message.get("tool_name") or message.get("name") or "tool"
            role, text = tools.result_turn(name, message_text(message, i))
        else:
            text = message_text(message, i)
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            if MARK in turns[-1][1] + text:  # ChatGLM3's messages: each one its own
                turns[-1][1] += text if text.startswith(MARK) else segment(role, text)
            else:
                turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    if not any(role == "user" for role, _ in turns):
        raise ApiError(400, "'messages' must contain at least one user message", param="messages")
    after_result = turns[-1][0] == "assistant" and ends_with_observation(turns[-1][1])
    prefix = turns.pop()[1] if turns[-1][0] == "assistant" and not after_result else ""
    tail = turns.pop()[1] if after_result else ""  # a tool's result: the reply follows it, not a prefill
    query = turns.pop()[1] + tail
    history, pending = [], None
    for role, text in turns:
        if role == "user":
            pending = text
        else:
            history.append((pending or "", text))
            pending = None
    return tools.system_text(system, instructions), query, history, prefix


def assistant_calls(tool_calls, i: int) -> list[dict]:
    """An assistant message's tool_calls as {id, name, arguments} (arguments parsed when they are JSON)."""
    if not isinstance(tool_calls, list):
        raise ApiError(400, f"messages[{i}].tool_calls must be a list", param="messages")
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"messages[{i}].tool_calls: each must be {{\"id\", \"type\": \"function\", "
                                f"\"function\": {{\"name\", \"arguments\"}}}}", param="messages")
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # kept as the text it is
        calls.append({"id": call.get("id"), "name": function["name"], "arguments": arguments})
    return calls

"""Constrained decoding: a grammar (a JSON Schema, a tool call) enforced token by token with llguidance.

Each constrained sequence owns a matcher. Before sampling, the matcher's bitmask of allowed ids sets every other
logit to -inf, so that no sample, however unlikely, can break the format; after sampling the matcher consumes
the token. Once the grammar is complete the matcher stops the reply (or allows only eos).

llguidance rather than xgrammar: the same JSON Schema coverage for our needs, masks computed lazily (~0.05 ms a
token on ChatGLM2's 65,024 ids, against a 700 ms CPU decode step), one dependency-free abi3 wheel per platform
(xgrammar pulls torch, triton and apache-tvm-ffi), MIT licensed, and errors that name the unsupported construct.
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a mask is applied: the HTTP layer builds grammars without it
    import torch

    from ..model.tokenizer import ChatGLM2Tokenizer

# JSON as json.dumps writes it ({"a": 1, "b": [2, 3]}): what ChatGLM2 writes unprompted, and no whitespace
# between tokens otherwise, so that a model that hesitates cannot spend its whole reply on indentation.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile; the message names the construct."""


def json_schema_grammar(schema: dict | None) -> str:
    """The grammar of one JSON value valid for `schema` (any JSON object when None), after the optional leading
    space a sentencepiece reply starts with."""
    return lark_grammar('start: " "? value\nvalue: ' + json_rule(schema or {"type": "object"}))


def json_rule(schema: dict) -> str:
    """A Lark rule body for a JSON Schema, with this server's whitespace and its objects closed."""
    schema = closed(schema)
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}},
                                 ensure_ascii=False)


NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
LITERALS = ("const", "enum", "default", "examples")


def closed(schema):
    """`schema` (a copy) where an object that lists its `properties` and says nothing of `additionalProperties`
    allows no other keys, as vLLM's llguidance backend does: a schema's author means those keys, and a model
    that hesitates would otherwise spend its reply inventing more (what OpenAI's strict mode requires anyway)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in NAMED_SCHEMAS and isinstance(value, dict):  # {name: schema}: the names are no keywords
            out[key] = {name: closed(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in LITERALS else closed(value)
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def tool_call_grammar(tools: list[dict], required: bool, parallel: bool) -> str:
    """The grammar of a reply that calls `tools` (OpenAI function definitions): one call, or with `parallel`
    one or more, one per line, each {"name": one of the tools, "arguments": valid for its parameters}. Unless
    `required`, the reply may be words instead: the model decides at its first character ("{" or not)."""
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": tool["name"]},
                                                        "arguments": tool.get("parameters") or {"type": "object"}},
                       "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]}
    lines = ['start: " "? ' + ("calls" if required else "(calls | words)"),
             "calls: call" + (' ("\\n" call)*' if parallel else ""),
             "call: " + json_rule(call)]
    if not required:
        lines.append(r"words: /[^{\s](.|\n)*/")
    return lark_grammar("\n".join(lines))


def chatglm3_call_grammar(tools: list[dict], required: bool) -> str:
    """The grammar of a ChatGLM3 reply to a tools request, in its own format: a call is the tool's name as the
    metadata line, then ```python / tool_call(key=literal, ...) / ``` on three lines, with the tool's parameters
    in their listed order, each at most once, the required ones present, each a Python literal of its type
    (python_value); unless `required`, the reply may be words instead (an empty metadata line, then anything)."""
    lines = ['start: " "? ' + ("call" if required else "(call | words)"),
             "call: " + " | ".join(f"call{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        lines.append(f'call{i}: {json.dumps(tool["name"])} "\\n" " "? "```python\\ntool_call(" '
                     f'{keyword_arguments(tool.get("parameters") or {})} ")\\n```"')
    lines += ['value: STRING | NUMBER | "True" | "False" | "None"',
              r"""STRING: /'[^'\\\n]*'/ | /"[^"\\\n]*"/""",
              r"NUMBER: /-?[0-9]+(\.[0-9]+)?/", r"INTEGER: /-?[0-9]+/",
              r"KEY: /[A-Za-z_][A-Za-z0-9_]*/"]
    if not required:
        lines.append(r"words: /\n(.|\n)*/")
    return lark_grammar("\n".join(lines))


def keyword_arguments(parameters: dict) -> str:
    """A Lark expression for `key=value, ...` as a schema's properties allow them (any keys without a list)."""
    properties = parameters.get("properties")
    if not isinstance(properties, dict):
        return '(KEY "=" value (", " KEY "=" value)*)?'
    keys = list(properties)
    needed = set(parameters.get("required") or ())
    items = [f'{json.dumps(key)} "=" {python_value(properties[key])}' for key in keys]

    def after(j: int) -> str:  # the arguments after key j-1
        if j == len(keys):
            return ""
        item = f'", " {items[j]}'
        return (item if keys[j] in needed else f"({item})?") + " " + after(j + 1)

    firsts = []  # which key comes first: any, up to the first required one
    for j, key in enumerate(keys):
        firsts.append(f"({items[j]} {after(j + 1)})")
        if key in needed:
            break
    if not firsts:
        return ""
    either = " | ".join(firsts)
    return f"({either})" if needed & set(keys) else f"({either})?"


def python_value(schema) -> str:
    """A Lark expression for a Python literal of a JSON Schema's value: its enum's values, a quoted string (as
    long as maxLength allows), an integer, a number, True/False, or any literal."""
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return "(" + " | ".join(json.dumps(repr(v)) for v in schema["enum"]) + ")"
    kind = schema.get("type")
    if kind == "string":
        most = schema.get("maxLength")
        count = f"{{0,{most}}}" if isinstance(most, int) and most >= 0 else "*"
        return f"/'[^'\\\\\\n]{count}'/"
    return {"integer": "INTEGER", "number": "NUMBER", "boolean": '("True" | "False")'}.get(kind, "value")


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


class Constraint:
    """One sequence's matcher: `apply` masks logits, `accept` consumes the sampled id."""

    def __init__(self, grammar: str, tokenizer: ChatGLM2Tokenizer, vocab_size: int, answer_prefix: str = ""):
        import llguidance
        import torch

        self.tokenizer = tokenizer
        self.matcher = llguidance.LLMatcher(guidance_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(short_error(self.matcher.get_error()))
        if answer_prefix and not self.matcher.consume_tokens(text_ids(tokenizer, answer_prefix)):
            raise GrammarError(f"the answer prefix {answer_prefix[:40]!r} does not begin a reply of this format")
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self.vocab_size = vocab_size

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [vocab] with every id the grammar does not allow next at -inf."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        allowed = ((self.bitmask.unsqueeze(1) & bit_values()) != 0).flatten()[:self.vocab_size]
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # cannot happen after apply(); never let it pass silently
            raise RuntimeError(f"the grammar refused token {token}: {short_error(self.matcher.get_error())}")

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more: the reply is done."""
        return self.matcher.is_stopped()


@cache
def bit_values() -> torch.Tensor:
    """The value of each of an int32's 32 bits, to unpack llguidance's bitmask."""
    import torch

    return torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)


def short_error(error: str) -> str:
    """llguidance's message without its parser dump."""
    return error.split("\n<state>")[0].strip()[:300]


def text_ids(tokenizer: ChatGLM2Tokenizer, text: str) -> list[int]:
    """Ids whose bytes are exactly `text`: sentencepiece's encode adds a leading "▁" (its dummy prefix), so the
    text is encoded after a newline, whose two pieces ("▁", "<0x0A>") are then dropped."""
    ids = tokenizer.sp.encode("\n" + text)
    return ids[2:]


def guidance_tokenizer(tokenizer: ChatGLM2Tokenizer, vocab_size: int):
    """llguidance's view of the vocabulary (each id's bytes), built once per tokenizer (~0.2 s)."""
    import llguidance

    cached = getattr(tokenizer, "_guidance", None)
    if cached is not None and cached[0] == vocab_size:
        return cached[1]
    pieces = [tokenizer.token_bytes(i) for i in range(vocab_size)]

    class Vocabulary:  # the shape llguidance.TokenizerWrapper reads
        eos_token_id = tokenizer.eos_id
        bos_token_id = None
        tokens = pieces
        special_token_ids = [i for i, piece in enumerate(pieces) if not piece]

        def __call__(self, text):
            return text_ids(tokenizer, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

    guidance = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=vocab_size)
    tokenizer._guidance = (vocab_size, guidance)
    return guidance

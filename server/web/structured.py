"""Structured output requests: OpenAI's `response_format` (and Ollama's `format`) -> a checked grammar.

The grammar is compiled here, before the job is queued, so that a schema the engine cannot follow is a 400 that
names the construct, not a failed generation.
"""

from __future__ import annotations

from ..engine.grammar import Constraint, GrammarError, json_schema_grammar
from .relay import tokenizer_of
from .validation import ApiError, shown


def response_format_grammar(value, param: str = "response_format") -> str | None:
    """OpenAI's response_format: text (no grammar), json_object (any object) or json_schema (that schema)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None and isinstance(spec, dict):
            schema = {}  # a json_schema without a schema: any JSON value, as OpenAI takes it
        if not isinstance(schema, dict):
            raise ApiError(400, f"'{param}.json_schema.schema' must be a JSON Schema object", param=param)
        return schema_grammar(schema, param)
    raise ApiError(400, f"'{param}' must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                        f"{{\"type\": \"json_schema\", \"json_schema\": {{\"name\": …, \"schema\": {{…}}}}}}, "
                        f"not {shown(value, 60)}", param=param)


def schema_grammar(schema: dict, param: str) -> str:
    try:
        return json_schema_grammar(schema)
    except ValueError as exc:  # llguidance refuses what is not a JSON object at all
        raise ApiError(400, f"'{param}' holds a schema that cannot be used: {exc}", param=param,
                       code="invalid_schema") from None


def needs_local_engine(engine, param: str) -> None:
    """Grammars and logprobs need the model's logits: a front end (--backend) refuses them by name."""
    if not engine.constrained_decoding:
        raise ApiError(400, f"'{param}' needs this server's own engine: with --backend send it to the engine "
                            "directly", param=param, code="unsupported_field")


def checked(grammar: str | None, engine, answer_prefix: str = "", param: str = "response_format") -> str | None:
    """`grammar` once it compiles against the model's vocabulary and the answer prefix can begin it."""
    if grammar is None:
        return None
    needs_local_engine(engine, param)
    tokenizer = tokenizer_of(engine)
    try:
        Constraint(grammar, tokenizer, engine.loaded.model.config.vocab_size, answer_prefix)
    except GrammarError as exc:
        raise ApiError(400, f"'{param}' cannot be used: {exc}", param=param, code="invalid_schema") from None
    return grammar

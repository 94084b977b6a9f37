"""The context budget: fit a chat request into the model's context by dropping the oldest history rounds.

ChatGLM2's `max_length` counts prompt and reply together; OpenAI's `max_tokens` counts the reply only. Both are
clamped to the context budget. The prompt must leave room for a reply (`reply_reserve` tokens, or less when
the request asks for less); old rounds go first, and a query that does not fit even alone is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import ChatGLM2Tokenizer


@dataclass
class GenerationRequest:
    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    answer_prefix: str = ""
    max_length: int | None = None  # prompt + reply, as in ChatGLM2; None = the context budget
    max_new_tokens: int | None = None  # reply only (OpenAI's max_tokens); overrides max_length
    top_p: float = 0.7
    temperature: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    dropped_rounds: int
    max_new_tokens: int


class ContextOverflow(Exception):
    """The query (with the answer prefix) does not fit the context even without history."""

    def __init__(self, prompt_tokens: int, limit: int, max_context: int):
        self.prompt_tokens, self.limit, self.max_context = prompt_tokens, limit, max_context
        super().__init__(
            f"the query needs {prompt_tokens} tokens but at most {limit} fit (context budget {max_context} "
            f"tokens, with room left for the reply); shorten the query or the answer prefix")


def fit_prompt(tokenizer: ChatGLM2Tokenizer, request: GenerationRequest, max_context: int,
               reply_reserve: int) -> FittedPrompt:
    if request.max_new_tokens is not None:
        total = max_context
        reserve = min(reply_reserve, request.max_new_tokens)
    else:
        total = min(request.max_length or max_context, max_context)
        reserve = min(reply_reserve, total // 4)
    limit = total - max(reserve, 1)

    history = list(request.history)
    dropped = 0
    ids = tokenizer.build_prompt(request.query, history, request.answer_prefix)
    while len(ids) > limit and history:
        history.pop(0)
        dropped += 1
        ids = tokenizer.build_prompt(request.query, history, request.answer_prefix)
    if len(ids) > limit:
        raise ContextOverflow(len(ids), limit, max_context)

    room = total - len(ids)
    max_new = room if request.max_new_tokens is None else min(request.max_new_tokens, room)
    return FittedPrompt(ids=ids, dropped_rounds=dropped, max_new_tokens=max_new)

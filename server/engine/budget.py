"""The context budget: fit a chat request into the model's context by dropping the oldest history rounds.

ChatGLM2's `max_length` counts prompt and reply together; OpenAI's `max_tokens` counts the reply only. Both are
clamped to the context budget. The prompt must leave room for a reply (`reply_reserve` tokens, or less when
the request asks for less); old rounds go first, and a query that does not fit even alone is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ContextOverflow  # noqa: F401 (defined in errors.py, importable here too)
from ..model.tokenizer import ChatGLM2Tokenizer, round_text

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy: logits / 1e-40 overflow to inf and softmax gives nan


@dataclass
class GenerationRequest:
    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str = ""  # ChatGLM3's system message; ChatGLM2 reads it before the first question
    answer_prefix: str = ""
    max_length: int | None = None  # prompt + reply, as in ChatGLM2; None = the context budget
    max_new_tokens: int | None = None  # reply only (OpenAI's max_tokens); overrides max_length
    top_p: float = 0.7
    temperature: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    grammar: str | None = None  # llguidance grammar the reply must follow (engine/grammar.py)
    logprobs: int | None = None  # report each reply token's logprob and this many top alternatives (None: off)
    prompt_ids: list[int] | None = None  # a raw prompt (/v1/completions): these ids instead of the chat template
    echo_logprobs: bool = False  # also score the prompt's tokens (runs it whole, not from the prefix cache)


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    dropped_rounds: int
    max_new_tokens: int


def fit_prompt(tokenizer: ChatGLM2Tokenizer, request: GenerationRequest, max_context: int,
               reply_reserve: int) -> FittedPrompt:
    if request.max_new_tokens is not None:
        total = max_context
        reserve = min(reply_reserve, request.max_new_tokens, total // 4)
    else:
        total = min(request.max_length or max_context, max_context)
        reserve = min(reply_reserve, total // 4)  # (a reserve above the whole context left no room at all)
    limit = total - max(reserve, 1)

    if request.prompt_ids is not None:  # a raw prompt is never cut: it fits or is refused
        dropped, ids = 0, list(request.prompt_ids)
    else:
        dropped = rounds_to_drop(tokenizer, request, limit)
        ids = tokenizer.build_prompt(request.query, request.history[dropped:], request.answer_prefix, request.system)
    if len(ids) > limit:
        raise ContextOverflow(len(ids), limit, max_context)

    room = total - len(ids)
    max_new = room if request.max_new_tokens is None else min(request.max_new_tokens, room)
    return FittedPrompt(ids=ids, dropped_rounds=dropped, max_new_tokens=max_new)


def rounds_to_drop(tokenizer: ChatGLM2Tokenizer, request: GenerationRequest, limit: int) -> int:
    """The fewest oldest rounds to drop so the prompt fits `limit` tokens (all of them when nothing fits).

    Re-tokenizing the whole prompt after each dropped round is quadratic (2,000 rounds took 42 s). Instead each
    round is tokenized once to estimate where the cut goes; the exact prompt is then built only around that
    point (the estimate is off by a few tokens: rounds are renumbered and pieces can merge across rounds).
    """
    history, query, prefix, system = request.history, request.query, request.answer_prefix, request.system

    def fits(dropped: int) -> bool:
        return len(tokenizer.build_prompt(query, history[dropped:], prefix, system)) <= limit

    if fits(0) or not history:
        return 0
    costs = [len(tokenizer.pieces(round_text(i, q, a))) for i, (q, a) in enumerate(history, start=1)]
    room = limit - len(tokenizer.build_prompt(query, [], prefix, system))
    dropped, kept = len(history), 0
    while dropped > 0 and kept + costs[dropped - 1] <= room:  # keep the newest rounds while they fit
        dropped -= 1
        kept += costs[dropped]
    while dropped < len(history) and not fits(dropped):
        dropped += 1
    while dropped > 0 and fits(dropped - 1):
        dropped -= 1
    return dropped

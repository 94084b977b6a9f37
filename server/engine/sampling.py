"""Sampling: logits -> probabilities -> a token, and the plain decode loop of one sequence.

The engine schedules the model's steps (model/forward.py) for many sequences at once; `generate_ids` is the plain
loop for one sequence, used by the benchmarks as the reference the engine is compared with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..model.forward import decode_one_token, prefill
from .budget import MIN_TEMPERATURE


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 0.7
    seed: int | None = None
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # drop tokens below min_p times the most likely one's probability


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0,
                    min_p: float = 0.0) -> torch.Tensor:
    """[vocab] logits -> [vocab] probabilities after temperature, then top-k, min-p and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k and top_k < probs.shape[-1]:
        probs[probs < probs.topk(top_k).values[-1]] = 0.0  # (ties at the k-th keep a few more: harmless)
    if min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens before it already reach top_p. The most likely always stays, also when
        # top_p is so small that it is 0 in float32 (1e-300): otherwise every token goes and the sum is 0.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p * sorted_probs.sum()
        outside[..., 0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum()


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature < MIN_TEMPERATURE:
        return greedy(logits)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)
    if not bool(torch.isfinite(probs).all()):  # logits with nan or inf (a broken model): never a crash
        return greedy(logits)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class Penalties:
    """OpenAI's presence and frequency penalties (over the reply's tokens) and the CTRL/transformers repetition
    penalty (over the prompt's and the reply's: what the ChatGLM2 demos expose)."""
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0

    @property
    def active(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0


class PenaltyState:
    """One sequence's token counts, kept as a [vocab] tensor so that a step costs two vector operations."""

    def __init__(self, penalties: Penalties, prompt_ids: list[int], vocab_size: int, device):
        self.penalties = penalties
        self.counts = torch.zeros(vocab_size, device=device)  # in the reply
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # in the prompt or the reply
        self.seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.penalties
        logits = logits.float()
        if p.repetition != 1.0:
            scaled = torch.where(logits > 0, logits / p.repetition, logits * p.repetition)
            logits = torch.where(self.seen, scaled, logits)
        if p.frequency or p.presence:
            logits = logits - self.counts * p.frequency - (self.counts > 0).float() * p.presence
        return logits

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self.seen[token] = True


def greedy(logits: torch.Tensor) -> int:
    """The most likely id; a nan counts as the least likely (argmax would pick it)."""
    return int(torch.nan_to_num(logits.float(), nan=float("-inf")).argmax())


def new_generator(sampling: Sampling, device) -> torch.Generator | None:
    """The random source of one sampled reply (None for greedy): seeded by the request, else at random."""
    if sampling.temperature < MIN_TEMPERATURE:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    return generator


def vocabulary_mask(vocab_size: int, first_special_id: int, stop_ids, device) -> torch.Tensor:
    """Added to logits: -inf for special and padding ids the tokenizer cannot show, except those that end a
    reply (eos; ChatGLM3's <|user|> and <|observation|>)."""
    mask = torch.zeros(vocab_size, device=device)
    mask[first_special_id:] = float("-inf")
    mask[list(stop_ids)] = 0.0
    return mask


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                 mask: torch.Tensor) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled ids, one at a time (eos included, after which it ends)."""
    generator = new_generator(sampling, model.device)
    cache = DynamicCache(config=model.config)
    logits = prefill(model, prompt_ids, cache)
    for step in range(max_new_tokens):
        token = sample(logits + mask, sampling, generator)
        yield token
        if step + 1 == max_new_tokens:
            return
        logits = decode_one_token(model, token, cache)

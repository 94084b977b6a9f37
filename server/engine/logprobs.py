"""Token logprobs: what the model made of each token, for clients that ask (OpenAI's `logprobs`, `echo`).

A token's logprob is the model's own log-softmax over the whole vocabulary, before anything the request changes
(temperature, penalties, top-p/k, the grammar): the likelihood an evaluation harness wants, whatever sampled it.
The top alternatives are the most likely ids a reply can show (special and padding ids are never offered).
Nothing here runs unless a request asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


def scored(logits: torch.Tensor, token: int, top: int, showable: torch.Tensor) -> TokenLogprob:
    """`token`'s logprob under `logits` [vocab], with the `top` most likely showable ids (`showable` is the
    vocabulary mask: 0 where an id can be shown, -inf where not)."""
    return scored_rows(logits[None], [token], top, showable)[0]


def scored_rows(logits: torch.Tensor, tokens: list[int], top: int, showable: torch.Tensor) -> list[TokenLogprob]:
    """One TokenLogprob per row of `logits` [rows, vocab]: row i scores tokens[i]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen)]
    values, ids = (logprobs + showable).topk(top, dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(row_ids, row_values)))
            for t, lp, row_ids, row_values in zip(tokens, chosen, ids.tolist(), values.tolist())]


class PromptScore:
    """The logprobs of a prompt's tokens as its chunks run: position i's logits score token i + 1, so the first
    token has none and each chunk's last row scores the next chunk's first token."""

    def __init__(self, top: int, showable: torch.Tensor):
        self.top, self.showable = top, showable
        self.logprobs: list[TokenLogprob | None] = [None]
        self.carry: torch.Tensor | None = None  # the last row of the previous chunk

    def add(self, chunk: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Score `chunk` from its logits [len(chunk), vocab]; returns the last row (the next token's logits)."""
        rows, tokens = logits[:-1], chunk[1:]
        if self.carry is not None:
            rows, tokens = torch.cat([self.carry[None], rows]), chunk
        if tokens:
            self.logprobs += scored_rows(rows, tokens, self.top, self.showable)
        self.carry = logits[-1]
        return logits[-1]

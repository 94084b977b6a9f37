"""One job being generated: its sampler, its incremental decoder and its stop rules.

The scheduler hands a sequence the logits of its next position (computed alone or batched with others);
`advance` samples a token, turns it into the job's Update events and says whether the sequence goes on.
"""

from __future__ import annotations

import time

import torch

from ..model.tokenizer import ChatGLM2Tokenizer
from .grammar import Constraint
from .jobs import Job, apply_stop
from .logprobs import PromptScore, scored
from .sampling import Penalties, PenaltyState, Sampling, new_generator, sample


class Sequence:
    def __init__(self, job: Job, tokenizer: ChatGLM2Tokenizer, mask: torch.Tensor, cached_tokens: int = 0):
        req = job.request
        self.job = job
        self.stop_ids = tokenizer.stop_ids  # eos, and ChatGLM3's next-turn roles
        self.mask = with_bias(mask, req.logit_bias)
        self.sampling = Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed, top_k=req.top_k,
                                 min_p=req.min_p)
        penalties = Penalties(req.presence_penalty, req.frequency_penalty, req.repetition_penalty)
        self.penalties = PenaltyState(penalties, job.prompt.ids, mask.shape[-1], mask.device) \
            if penalties.active else None
        self.generator = new_generator(self.sampling, mask.device)
        self.constraint = Constraint(req.grammar, tokenizer, mask.shape[-1], req.answer_prefix) \
            if req.grammar else None
        self.decoder = tokenizer.stream_decoder(continuation=req.prompt_ids is not None)
        self.ids = list(job.prompt.ids)  # every id whose keys and values are in this sequence's cache
        self.cached_tokens = cached_tokens
        self.next_token: int | None = None  # sampled, not yet run through the model
        self.completion_tokens = 0
        self.reason = "length"
        self.first_token_at: float | None = None
        self.shown = req.answer_prefix
        self.vocabulary_mask = mask
        self.prompt_score = PromptScore(req.logprobs or 0, mask) if req.echo_logprobs else None

    def advance(self, logits: torch.Tensor) -> bool:
        """Sample the next token from `logits` [vocab] and report it. False when the sequence has ended."""
        if self.prompt_score is not None and self.job.prompt_logprobs is None:  # the prompt has run: report it
            self.job.prompt_logprobs = self.prompt_score.logprobs
        if self.job.prompt.max_new_tokens <= 0:  # only the prompt was asked for (scored with echo)
            self.reason = "length"
            return False
        model_logits = logits
        if self.penalties is not None:
            logits = self.penalties.apply(logits)
        logits = logits + self.mask
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        token = sample(logits, self.sampling, self.generator)
        if self.penalties is not None:
            self.penalties.add(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self.reason = "stop"
            return False
        if self.job.request.logprobs is not None:  # (job.logprobs[i] belongs to completion token i + 1)
            self.job.logprobs.append(scored(model_logits, token, self.job.request.logprobs, self.vocabulary_mask))
        self.completion_tokens += 1
        if self.decoder.add(token):
            visible, hit = apply_stop(self.decoder.text, self.job.request.stop)
            self.shown = self.job.show(visible, self.completion_tokens, self.shown)
            if hit:
                self.reason = "stop"
                return False
        if self.constraint is not None and self.constraint.complete:
            self.reason = "stop"
            return False
        if self.job.cancelled.is_set():
            self.reason = "interrupted"
            return False
        if self.completion_tokens >= self.job.prompt.max_new_tokens:
            self.reason = "length"
            return False
        self.next_token = token
        return True

    def fed(self) -> None:
        """The model has run `next_token`: its keys and values are in the cache now."""
        self.ids.append(self.next_token)
        self.next_token = None

    def finish(self, error: str | None = None) -> None:
        """Flush what the decoder holds back and send the Finished event (reason `error` when `error` is set)."""
        self.decoder.flush()
        generated = apply_stop(self.decoder.text, self.job.request.stop)[0]
        self.job.finish(generated, self.shown, self.reason, self.completion_tokens, self.first_token_at,
                        self.cached_tokens, error)


def with_bias(mask: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """The vocabulary mask plus a request's logit_bias (a banned id stays banned)."""
    if not bias:
        return mask
    mask = mask.clone()
    ids = torch.tensor(list(bias), dtype=torch.long, device=mask.device)
    mask[ids] += torch.tensor(list(bias.values()), dtype=mask.dtype, device=mask.device)
    return mask

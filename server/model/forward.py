"""One forward pass of the model over a KV cache: a prompt (prefill) or one token (decode)."""

from __future__ import annotations

import inspect

import torch
from transformers import GlmForCausalLM

# transformers renamed `past_key_values` to `cache` after 5.20 (the Python 3.10 bundle pins 5.20.x): use what
# this version takes. The cache object is updated in place, so it is passed in and never read back from outputs.
CACHE_ARG = "cache" if "cache" in inspect.signature(GlmForCausalLM.forward).parameters else "past_key_values"


def forward(model, ids: list[int], cache, every_position: bool = False) -> torch.Tensor:
    """Run `ids` after what `cache` holds; return the logits of the last position [vocab], or of every position
    [len(ids), vocab] (to score a prompt's tokens)."""
    input_ids = torch.tensor([ids], device=model.device)
    # logits_to_keep=1: a long prompt would otherwise materialise [prompt, vocab] logits for nothing
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=0 if every_position else 1,
                **{CACHE_ARG: cache})
    return out.logits[0] if every_position else out.logits[0, -1]


def prefill(model, prompt_ids: list[int], cache, every_position: bool = False) -> torch.Tensor:
    return forward(model, prompt_ids, cache, every_position)


def decode_one_token(model, token_id: int, cache) -> torch.Tensor:
    return forward(model, [token_id], cache)

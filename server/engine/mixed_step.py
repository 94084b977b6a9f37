"""A decode step of the batch and the next chunk of a waiting prompt in one forward pass (on the CPU).

Run apart, a chunk and a step each read every weight: a running stream waits for both between two of its
tokens. Run together, the linear layers multiply the batch's rows and the chunk's rows in one call, reading the
weights once; only attention is split, each part over its own keys: the batch's rows one by one over their own
cache (as Batch.step does), the chunk's rows over the prompt's cache, causally. The calls are those the parts
make apart, so with row-independent linear layers (the int8 and int4 kernels, one row's activations quantized on
their own) every row's logits are those it gets apart.

The forward walks the decoder layers itself (GlmModel.forward takes one cache and one mask for all rows); each
layer hands its new keys and values to `update` below and calls the registered attention with `split=` this
object (attention.rows_attention).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from ..model.attention import cpu_attention
from ..model.cpu_quant import QuantizedLinear, expands_from_rows
from ..model.forward import CACHE_ARG


def exact_rows(model) -> int:
    """The most rows a mixed pass may carry with every row's logits those it gets apart. The CPU's quantized
    layers are row-independent (integer sums, each row's activations quantized on its own) below the rows from
    which a layer expands its weights to bfloat16 for prompts (cpu_quant.py); a dense float matmul may round a
    row otherwise with other rows beside it: 0 (no mixed passes) where any linear layer is dense (also
    bitsandbytes', whose LLM.int8 depends on the other rows by design)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    if not layers or any(isinstance(m, nn.Linear) for m in layers):
        return 0
    return expands_from_rows(model) - 1


class MixedStep:
    """The rows of one forward pass: the batch's next tokens first, then the prompt chunk."""

    def __init__(self, batch_cache: DynamicCache, pads: list[int], prompt_cache: DynamicCache, chunk: int):
        self.batch_cache, self.pads, self.prompt_cache = batch_cache, pads, prompt_cache
        self.rows = len(pads)
        self.chunk = chunk
        self.past = prompt_cache.get_seq_length()  # prompt tokens before the chunk

    # the cache side of a decoder layer: its keys and values of the step, [1, kv heads, rows + chunk, dim]
    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        r = self.rows
        self.batch_cache.update(keys[0, :, :r].unsqueeze(2).transpose(0, 1).contiguous(),
                                values[0, :, :r].unsqueeze(2).transpose(0, 1).contiguous(), layer_idx)
        self.prompt_cache.update(keys[:, :, r:], values[:, :, r:], layer_idx)
        return keys, values  # (unused: attention reads each part's own cache)

    def attention(self, module, query: torch.Tensor, scaling: float | None = None, **kwargs):
        """[1, heads, rows + chunk, dim] queries -> [1, rows + chunk, heads, dim], each part over its own keys."""
        layer = module.layer_idx
        ours, prompt = self.batch_cache.layers[layer], self.prompt_cache.layers[layer]
        parts = [cpu_attention(module, query[:, :, i:i + 1], ours.keys[i:i + 1, :, pad:],
                               ours.values[i:i + 1, :, pad:], None, scaling=scaling, **kwargs)[0]
                 for i, pad in enumerate(self.pads)]
        # as prefill runs a chunk: from the prompt's start on SDPA's causal kernel, one token without a mask (it
        # sees every key), otherwise with the causal mask over the keys before it
        mask = None
        if self.past and self.chunk > 1:
            keys = self.past + self.chunk
            mask = torch.ones(self.chunk, keys, dtype=torch.bool, device=query.device).tril(self.past)[None, None]
        parts.append(cpu_attention(module, query[:, :, self.rows:], prompt.keys, prompt.values, mask,
                                   scaling=scaling, **kwargs)[0])
        return torch.cat(parts, dim=1), None


def forward(model, next_tokens: list[int], positions: list[int], step: MixedStep, chunk_ids: list[int]):
    """Logits [rows, vocab] of the batch's next positions and [vocab] of the chunk's last one."""
    inner = model.model
    device = model.device
    input_ids = torch.tensor([next_tokens + chunk_ids], device=device)
    position_ids = torch.tensor([positions + list(range(step.past, step.past + len(chunk_ids)))], device=device)
    hidden = inner.embed_tokens(input_ids)
    position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    for layer in inner.layers[:model.config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings,
                       position_ids=position_ids, use_cache=True, split=step, **{CACHE_ARG: step})
    hidden = inner.norm(hidden)
    keep = list(range(step.rows)) + [step.rows + len(chunk_ids) - 1]
    logits = model.lm_head(hidden[:, keep])[0]
    return logits[:-1], logits[-1]

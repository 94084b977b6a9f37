"""Attention for the engine: SDPA, except one decoding token on the CPU, and row by row in a padded batch.

One token's attention on the CPU through torch's SDPA takes its flash-attention kernel, which for a single query
row and grouped KV heads costs ~0.3 ms at 64 keys and grows to ~15 ms at 4,000 (AMD Zen 4, 2 threads): ~0.4 s of
every decode step at 4k context, more than the weights' matmuls. The same sums as two small matmuls over each KV
head's group of query heads (float32, like SDPA's own accumulation) take 0.06 / 0.8 ms (docs/performance.md).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "chatglm2_rows"


def decode_attention(module, query, key, value, attention_mask, scaling: float | None = None, **kwargs):
    """SDPA's result for [batch, heads, 1, dim] queries without a mask, as matmuls: softmax(q k^T * scale) v per
    KV head, its query heads stacked as rows. Anything else goes to SDPA."""
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    if rows != 1 or query.device.type != "cpu" or attention_mask is not None or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scale).softmax(-1)
    out = torch.matmul(scores, value.float()).to(query.dtype)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None  # [batch, 1, heads, dim], as SDPA's wrapper


def rows_attention(module, query, key, value, attention_mask, row_pads: list[int] | None = None, **kwargs):
    """Row by row without each row's padding when `row_pads` is given: one padded attention over all rows hides
    the padding through the mask, but sums in another order than the row alone would (other lengths, other
    vector blocks), which flips near-tied tokens in 16-bit. Row by row costs a few small calls per layer."""
    if row_pads is None:
        return decode_attention(module, query, key, value, attention_mask, **kwargs)
    rows = [decode_attention(module, query[i:i + 1], key[i:i + 1, :, pad:], value[i:i + 1, :, pad:], None,
                             **kwargs)[0] for i, pad in enumerate(row_pads)]
    return torch.cat(rows), None


AttentionInterface.register(ATTENTION, rows_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)

"""Attention for the engine: SDPA, with a shortcut for grouped KV heads on the CPU, row by row in a padded batch.

torch's SDPA on the CPU handles grouped KV heads badly where the query has few rows. transformers repeats each KV
head for every query head it serves (16 for ChatGLM2) and SDPA runs 32 heads over the copies; a single row takes
the flash kernel at ~15 ms a layer at 4,000 keys (AMD Zen 4, 2 threads: ~0.4 s of every decode step, more than
the weights), a 16-row prompt chunk ~8-13 ms a layer at 2,000 keys. So on the CPU:
- one decoding row: two float32 matmuls per KV head with its query heads stacked as rows (SDPA's accumulation),
  0.06 ms at 64 keys, 0.8 ms at 4,000;
- rows with a mask (a prompt chunk over the cache): SDPA on the KV heads themselves, each one's query heads
  stacked as rows and the mask repeated to match: the same kernel on the same numbers (bit-identical on a Zen 4,
  within one rounding where the kernel rounds by its row blocks), in less than half the time (16 rows over
  2,000 keys: 3.9 ms against 8.4).
Whole prompts from the start (causal, no mask) stay on SDPA's causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "chatglm2_rows"
STACKED_MIN_ROWS = 4  # with 2-3 rows SDPA takes another inner path for the stacked rows (not bit-identical on Zen 4)


def cpu_attention(module, query, key, value, attention_mask, scaling: float | None = None, **kwargs):
    """SDPA's result for [batch, heads, rows, dim] queries, through the shortcuts above on the CPU."""
    batch, heads, rows, _ = query.shape
    if query.device.type == "cpu" and heads % key.shape[1] == 0:
        if rows == 1 and attention_mask is None:
            return decode_attention(query, key, value, scaling)
        if rows >= STACKED_MIN_ROWS and attention_mask is not None and batch == 1:
            return stacked_heads_sdpa(query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def decode_attention(query, key, value, scaling: float | None):
    """softmax(q k^T * scale) v for one query row, per KV head over its group of query heads, in float32."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scale).softmax(-1)
    out = torch.matmul(scores, value.float()).to(query.dtype)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None  # [batch, 1, heads, dim], as SDPA's wrapper


def stacked_heads_sdpa(query, key, value, attention_mask, scaling: float | None):
    """SDPA for one sequence's rows on its KV heads: each KV head's query heads stacked as rows, the mask
    repeated for them (a mask per query head regrouped the same way)."""
    _, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if attention_mask.shape[1] == 1:
        mask = attention_mask.repeat(1, 1, group, 1)  # [1, 1, group * rows, keys]
    else:
        mask = attention_mask.expand(1, heads, rows, -1).reshape(1, kv_heads, group * rows, -1)
    out = F.scaled_dot_product_attention(query.reshape(1, kv_heads, group * rows, dim), key, value, attn_mask=mask,
                                         scale=scaling)
    return out.view(1, heads, rows, dim).transpose(1, 2), None  # [1, rows, heads, dim], as SDPA's wrapper


def rows_attention(module, query, key, value, attention_mask, row_pads: list[int] | None = None, split=None,
                   **kwargs):
    """Row by row without each row's padding when `row_pads` is given: one padded attention over all rows hides
    the padding through the mask, but sums in another order than the row alone would (other lengths, other
    vector blocks), which flips near-tied tokens in 16-bit. Row by row costs a few small calls per layer.
    `split`: a decode step and a prompt chunk in one pass (engine/mixed_step.py), each over its own keys."""
    if split is not None:
        return split.attention(module, query, **kwargs)
    if row_pads is None:
        return cpu_attention(module, query, key, value, attention_mask, **kwargs)
    rows = [cpu_attention(module, query[i:i + 1], key[i:i + 1, :, pad:], value[i:i + 1, :, pad:], None,
                          **kwargs)[0] for i, pad in enumerate(row_pads)]
    return torch.cat(rows), None


AttentionInterface.register(ATTENTION, rows_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)

"""A long prompt run one decoder layer per turn beside the batch's decode steps (on the CPU, where its rows make
the quantized layers expand their weights).

Token chunks keep a prompt's rows few, so they stay on the quantized kernels: at 4-bit ~80 ms a prompt token on 2
cores, against ~10 once a layer has expanded its weights to bfloat16 for many rows (cpu_quant.py). Run whole, a
prompt expands each weight once for all its rows, but freezes the other streams until it is done. Layer by
layer, each turn runs every row of a piece of the prompt (up to PROMPT_PIECE tokens, as many as keep the pass
within a token chunk's) through one decoder layer, expanding that layer's weights once, and then the batch's
decode step: the streams pause for one layer's share of the piece, and the prompt costs about what it costs
whole plus the decode steps (docs/performance.md, "Layer by layer").

The calls are those the model makes for the piece whole (the same layers on the same rows, the same causal mask
and positions, made as GlmModel.forward makes them), so the piece's logits are those it gets run whole alone.
"""

from __future__ import annotations

import sys

import torch
from transformers.masking_utils import create_causal_mask

from ..model import cpu_kernels
from ..model.cpu_quant import expands_from_rows
from ..model.forward import CACHE_ARG


def pass_tokens(kernels: dict | None, bits: int, layers: int, prefill_chunk: int) -> int:
    """The most prompt tokens one layer pass may take so that it costs no more than a token chunk's pass
    (`prefill_chunk` rows through every layer on the quantized kernel), which the streams wait for otherwise: one
    layer expanding its weights, then the rows on the dense matmul. From the start-up timings of one matrix
    (cpu_kernels.py: its kernel's, its dense matmul's cost per row and its expansion; a layer scales them alike).
    On an AMX Xeon a whole 2,048-token piece fits; where bfloat16 runs on AVX512 alone (a Zen 4) a fraction of it.
    0: no such timings (a GPU, no expansion measured)."""
    kernels = kernels or {}
    prefill = (kernels.get("measured") or {}).get("prefill_ms", {})
    int4 = kernels.get("int4", "torch")
    kernel = prefill.get(cpu_kernels.kernel_key(bits, kernels.get("int8"), int4))
    dense = prefill.get(kernels.get("dense_dtype", ""))
    expand = prefill.get(cpu_kernels.expand_key(bits, int4))
    if kernel is None or dense is None or expand is None:
        return 0
    kernel_row, dense_row = kernel / cpu_kernels.PREFILL_ROWS, dense / cpu_kernels.DENSE_ROWS
    return max(0, int((layers * prefill_chunk * kernel_row - expand) / dense_row))


def layered_from(model, prefill_chunk: int, piece_tokens: int) -> int:
    """Prompt pieces of this many tokens or more run layer by layer beside decode steps, pieces of at most
    `piece_tokens` (pass_tokens): where their rows make a quantized layer expand its weights (a token chunk's
    rows stay on the slower kernel) and the layers take fewer passes than `prefill_chunk`-token chunks would.
    Never (sys.maxsize) where no layer expands for any prompt (the int8 GEMMs, plain AVX2 CPUs), the layers are
    dense (there a token chunk costs what its rows cost in a layer pass, and chunks keep the pauses shorter), or
    a piece within a chunk's pass holds fewer than twice those tokens: the estimate leaves out attention and the
    small ops and moves with the machine's load, and near the line a layer pass costs more than a chunk's (on an
    AVX512 CPU without AMX, emulated: 556-token pieces paused the streams longer, with no sooner first token;
    docs/performance.md). An AMX Xeon's figures allow whole pieces, 5 times the line."""
    expand = expands_from_rows(model)
    least = max(expand, model.config.num_hidden_layers * prefill_chunk)
    return least if expand != sys.maxsize and piece_tokens >= 2 * least else sys.maxsize


class LayeredPiece:
    """Up to PROMPT_PIECE prompt tokens on their way through the decoder layers: the hidden states between two
    layers (16 MB for 2,048 tokens of ChatGLM2-6B) and what every layer takes alike."""

    def __init__(self, model, ids: list[int], cache):
        inner = model.model
        self.model, self.cache = model, cache
        self.hidden = inner.embed_tokens(torch.tensor([ids], device=model.device))
        past = cache.get_seq_length()  # (before any layer has taken the piece's keys)
        self.position_ids = torch.arange(past, past + len(ids), device=model.device).unsqueeze(0)
        self.mask = create_causal_mask(config=inner.config, inputs_embeds=self.hidden, attention_mask=None,
                                       position_ids=self.position_ids, **{CACHE_ARG: cache})
        self.position_embeddings = inner.rotary_emb(self.hidden, position_ids=self.position_ids)
        self.next_layer = 0

    def run_layer(self) -> torch.Tensor | None:
        """Run the next decoder layer (its keys and values go to the cache); after the last one return the
        logits of the piece's last position [vocab], before it None."""
        inner = self.model.model
        layer = inner.layers[self.next_layer]
        self.hidden = layer(self.hidden, attention_mask=self.mask, position_embeddings=self.position_embeddings,
                            position_ids=self.position_ids, use_cache=True, **{CACHE_ARG: self.cache})
        self.next_layer += 1
        if self.next_layer < self.model.config.num_hidden_layers:
            return None
        hidden = inner.norm(self.hidden)
        return self.model.lm_head(hidden[:, -1:])[0, -1]

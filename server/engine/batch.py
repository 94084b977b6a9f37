"""Sequences that decode together: their caches joined into one left-padded KV cache, one forward pass a step.

Decoding is bound by reading the weights, so one step for several sequences costs little more than a step for
one (README, Performance). Rows have different lengths: shorter rows are padded on the left, each row's position
ids count only its own tokens, and attention runs row by row on each row's own keys (attention.rows_attention),
so a row's logits are bit for bit those it gets alone wherever the linear layers are row-independent (README). A
joining row pads whichever side is shorter; rows that end are dropped, and padding that no row needs any more is
cut off. Nothing here writes into a cache tensor in place (the cache only concatenates),
which lets a row start from tensors the prefix cache still holds.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..model.attention import ATTENTION
from ..model.forward import CACHE_ARG
from . import mixed_step
from .sequence import Sequence


class Batch:
    def __init__(self, model):
        model.set_attn_implementation(ATTENTION)
        if model.device.type == "cuda":
            # torch picks cuDNN's attention on Hopper GPUs, which builds a plan for every new key length, i.e.
            # every decode step: ~2 ms of CPU per layer, 55 of a 57 ms step on an H200 (docs/performance.md).
            # Flash and memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = model
        self.rows: list[Sequence] = []
        self.pads: list[int] = []  # zeros on the left of each row
        self.cache: DynamicCache | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """Columns of the padded cache."""
        return self.cache.get_seq_length() if self.cache is not None else 0

    def add(self, seq: Sequence, cache: DynamicCache) -> None:
        """Add a sequence whose own cache (batch of one) holds `seq.ids`."""
        if not self.rows:  # alone: its cache becomes the batch's as it is
            self.rows, self.pads, self.cache = [seq], [0], cache
            return
        mine, theirs = self.length, cache.get_seq_length()
        for ours, new in zip(self.cache.layers, cache.layers):
            ours.keys = torch.cat([left_pad(ours.keys, theirs - mine), left_pad(new.keys, mine - theirs)])
            ours.values = torch.cat([left_pad(ours.values, theirs - mine), left_pad(new.values, mine - theirs)])
        grow = max(theirs - mine, 0)
        self.pads = [pad + grow for pad in self.pads] + [max(mine - theirs, 0)]
        self.rows.append(seq)

    def remove(self, ended: list[int]) -> None:
        """Drop the rows at these indices."""
        ended = set(ended)
        keep = [i for i in range(len(self.rows)) if i not in ended]
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        if not keep:
            self.cache = None
            return
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        trim = min(self.pads)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.pads = [pad - trim for pad in self.pads]

    def row_tensors(self, i: int, device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's keys and values without padding, copied (to `device`) so the batch's tensors can go."""
        pad = self.pads[i]
        return [(layer.keys[i:i + 1, :, pad:].to(device, copy=True),
                 layer.values[i:i + 1, :, pad:].to(device, copy=True)) for layer in self.cache.layers]

    def positions(self) -> list[int]:
        """Each row's next position: its own length, without its padding."""
        return [self.length - pad for pad in self.pads]

    def step(self) -> torch.Tensor:
        """Run every row's next token; return the logits of each row's next position [rows, vocab]."""
        device = self.cache.layers[0].keys.device
        input_ids = torch.tensor([[seq.next_token] for seq in self.rows], device=device)
        rows = {}
        if len(self.rows) > 1:
            rows = {"row_pads": self.pads, "position_ids": torch.tensor(self.positions(), device=device)[:, None]}
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{CACHE_ARG: self.cache}, **rows)
        for seq in self.rows:
            seq.fed()
        return out.logits[:, -1]

    def step_with_chunk(self, chunk: list[int], prompt_cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` and the next `chunk` of a prompt (its cache: `prompt_cache`) in one forward pass
        (mixed_step.py); return the rows' logits [rows, vocab] and the chunk's last [vocab]."""
        step = mixed_step.MixedStep(self.cache, self.pads, prompt_cache, len(chunk))
        logits, prompt_logits = mixed_step.forward(self.model, [seq.next_token for seq in self.rows],
                                                   self.positions(), step, chunk)
        for seq in self.rows:
            seq.fed()
        return logits, prompt_logits


def left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """[batch, heads, length, dim] with `columns` zero positions in front (the tensor itself when none)."""
    if columns <= 0:
        return tensor
    zeros = tensor.new_zeros(*tensor.shape[:2], columns, tensor.shape[3])
    return torch.cat([zeros, tensor], dim=2)


def cache_from(config, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these per-layer keys and values as they are (not copied)."""
    cache = DynamicCache(config=config)
    for layer, (keys, values) in zip(cache.layers, tensors):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache

"""How many rows decode together and how large the prefix cache is, from the device and its free memory."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model.loader import LoadedModel

log = logging.getLogger(__name__)

GIB = 1024**3
# Rows decoded together by default. CPU: 4 rows give 2.5x one row's tokens/s at 0.63x the speed per row, 8 add
# little (docs/performance.md). CUDA: not measured here (no GPU); a GPU is further from compute-bound at 8 rows.
DEFAULT_MAX_BATCH = {"cpu": 4, "cuda": 8}
# Memory kept free beside the batch's caches: the prompt of a joining job runs while the batch waits.
RESERVE_BYTES = {"cpu": 2 * GIB, "cuda": GIB}
# Prompt tokens run between two decode steps while other replies stream (chunked prefill). On a CPU each prompt
# row costs a third to a fifth of a decode step (AMD Zen 4, 2 cores): 64-token chunks paused the other streams
# 8.6 s each at 4-bit (docs/performance.md); 16 keep a pause to ~2.5 s. There the chunk runs inside the decode
# step, and the 16 are the pass's rows in all, the step's among them: the int8 GEMMs multiply 32 activation rows
# then (two per token), two 16-row AMX tiles; 3 + 16 took a third tile and 1.4x the time (Emerald Rapids, 8-bit,
# docs/performance.md). On a GPU (an H200, docs/performance.md)
# a 2,000-token prompt whole paused the other streams no longer than in 512-token chunks and reached its first
# token 2-3x sooner: chunks there start at 2,048 tokens.
DEFAULT_PREFILL_CHUNK = {"cpu": 16, "cuda": 2048}
# The most prompt tokens one forward pass runs, also with nothing else decoding: a whole 32k prompt in one pass
# needs ~4 GB of activations beside the model (the MLP's intermediates grow with its length); in pieces of
# 2,048 its activations stay ~0.66 GB at any length, at the same speed (docs/performance.md, Long prompts).
PROMPT_PIECE = 2048


def batch_size(loaded: LoadedModel, asked: int, prefix_cache_bytes: int = 0) -> int:
    """Rows decoded together: as asked (or the device's default), and no more than the memory left after
    loading holds with every row at the full context. The prefix cache lives in RAM: on a CPU it shares that
    memory with the batch (a full prefix cache must not leave the batch without room); on a GPU it does not."""
    wanted = asked or DEFAULT_MAX_BATCH.get(loaded.device.type, 1)
    room = room_for_caches(loaded, prefix_cache_bytes)
    if room is None:
        return wanted
    plan = loaded.plan
    fits = max(1, room // (kv_bytes_per_token(loaded) * plan.max_context))
    if fits < wanted:
        log.info("the free memory holds %d requests at the full context of %d tokens (not %d)", fits,
                 plan.max_context, wanted)
    return int(min(wanted, fits))


def context_that_fits(loaded: LoadedModel, prefix_cache_bytes: int = 0) -> int:
    """The context one request can have in the memory left after loading: the plan's, or less when its keys and
    values at full length (~0.9 GB at 32k tokens in 16 bits) would not fit beside the reserve. A prompt longer
    than what fits is then refused (400) instead of running the machine out of memory."""
    wanted = loaded.plan.max_context
    free = room_for_caches(loaded, prefix_cache_bytes)
    if free is None:
        return wanted
    room = free // kv_bytes_per_token(loaded)
    if room >= wanted:
        return wanted
    fits = max(1024, int(room) // 1024 * 1024)
    log.warning("the free memory holds the keys and values of %d tokens, not the context of %d: prompts are "
                "limited to %d tokens (free memory, or a smaller --max-context, changes this)", room, wanted,
                min(fits, wanted))
    return min(fits, wanted)


def room_for_caches(loaded: LoadedModel, prefix_cache_bytes: int) -> int | None:
    """Bytes the requests' keys and values may take: the free memory after loading, less the reserve and, on a
    CPU, the prefix cache's budget (it lives in the same RAM); None when the free memory is unknown."""
    device = loaded.device.type
    free = free_memory(device)
    if free is None:
        return None
    return free - (prefix_cache_bytes if device == "cpu" else 0) - RESERVE_BYTES.get(device, GIB)


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Keys and values of one token in every layer, in the compute dtype."""
    from ..model.loader import DTYPES

    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = DTYPES[loaded.plan.dtype].itemsize
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def free_memory(device: str) -> int | None:
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil  # installed with accelerate
    except ImportError:
        return None
    return psutil.virtual_memory().available


def default_prompt_cache_mb() -> int:
    """1 GiB (~37,000 tokens of ChatGLM2-6B's 16-bit keys and values), a sixteenth of the RAM on smaller PCs."""
    from ..model.profiles import total_ram

    ram = total_ram()
    return 1024 if not ram else int(min(1024, ram / 16 / 1024**2))

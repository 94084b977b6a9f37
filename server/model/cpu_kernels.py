"""Which CPU kernels run the quantized weights on this machine, chosen by timing them at the real model's size.

The right choice depends on the CPU, and guessing from its name has failed before: FBGEMM's and oneDNN's int8
GEMMs sum 8-bit activations exactly with VNNI/AMX and saturate without (int8_gemm.activation_bits); FBGEMM reads
weights near the memory's speed where oneDNN did not on an AMD Zen 4, and the other way round with AMX; bfloat16
matmuls are fast with AMX or
AVX512-BF16 and ~3x slower than torch's int8 kernel on plain AVX2, where expanding int8 weights to bfloat16 for a
prompt only costs time. So each candidate is timed on matrices of ChatGLM2-6B's MLP shape, three different
copies in turn so that no weight is served from the CPU's cache (a single matrix fits a 32 MB L3 and looks
several times faster than the model is), each figure the median of several tries:

- decode: one token through each kernel (int8 on torch's kernel, on FBGEMM's and oneDNN's GEMMs where exact,
  int4, and the bfloat16 matmul): lets `auto` pick the fastest precision that fits the RAM;
- the int8 kernel: among those within DECODE_MARGIN of the fastest at decode, the fastest at PREFILL_ROWS rows
  (two int8 kernels often decode within a few % of each other, and a prompt of 20 tokens then costs 3 times
  more on one than the other: the margin keeps noise from deciding);
- prefill: PREFILL_ROWS tokens through the kernel, DENSE_ROWS through the bfloat16 and the float32 matmul (the
  faster is the dense dtype: float32 on CPUs without bfloat16 units), and (where the matmul's rows are cheaper)
  the cost of expanding one matrix: from how many tokens expanding pays off. Never where a kernel row costs no
  more than a matmul row: then every prompt runs on the kernel, with no per-forward expansion.

It takes a few seconds, once per process (`measure()` is cached). The figures are logged and shown in /health.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_quant, int8_gemm

log = logging.getLogger(__name__)

SHAPE = (13696, 4096)  # half of ChatGLM2-6B's gate_up / its down projection: 56 M weights
COPIES = 3  # matrices used in turn: 168 MB of int8 together, well past any CPU's last-level cache
DECODE_TRIES = 7
PREFILL_ROWS = 32  # a kernel's cost grows about linearly with the rows: 32 tell its cost per row
DENSE_ROWS = 128  # a dense matmul gets cheaper per row as rows grow: measured where long prompts run
PREFILL_TRIES = 3
DECODE_MARGIN = 1.1
NEVER = sys.maxsize


@dataclass(frozen=True)
class KernelChoice:
    int8: str  # "torch", "fbgemm" or "onednn": which kernel runs 8-bit weights
    dense_from_tokens: dict[int, int]  # bits -> rows from which a prompt expands the weights (NEVER: it does not)
    dense_dtype: str = "bfloat16"  # what they expand to: bfloat16, or float32 where its matmul is faster
    decode_ms: dict[str, float] = field(default_factory=dict)  # one token, one SHAPE matrix, by candidate
    prefill_ms: dict[str, float] = field(default_factory=dict)  # PREFILL_ROWS tokens, and expanding one matrix
    seconds: float = 0.0  # what measuring took

    def decode_ms_at(self, bits: int) -> float | None:
        """The chosen kernel's time per matrix for one token at this precision (16: the bfloat16 matmul)."""
        key = {8: f"int8-{self.int8}", 4: "int4", 16: "bfloat16"}[bits]
        return self.decode_ms.get(key)

    def as_dict(self) -> dict:
        """What /health shows."""
        return {"int8": self.int8, "dense_dtype": self.dense_dtype,
                "dense_from_tokens": {str(bits): None if rows == NEVER else rows
                                      for bits, rows in self.dense_from_tokens.items()},
                "decode_ms": self.decode_ms, "prefill_ms": self.prefill_ms, "measured_in_s": self.seconds}


def median_ms(run: Callable[[int], object], tries: int, copies: int = COPIES) -> float:
    """Median over `tries` of the time per call of run(copy), each try one call per copy (after a warm round)."""
    for i in range(copies):
        run(i)
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        for i in range(copies):
            run(i)
        times.append((time.perf_counter() - start) / copies)
    return statistics.median(times) * 1000


def prefill_ms(run: Callable[[int], object], tries: int = PREFILL_TRIES) -> float:
    """Prompts are compute-bound: one matrix, no need to defeat the cache."""
    return median_ms(run, tries, copies=1)


def dense_threshold(kernel_ms: float, dense_ms: float, expand_ms: float) -> int:
    """Rows from which expanding then multiplying densely beats the kernel: expand + rows x dense-row <
    rows x kernel-row (kernel_ms for PREFILL_ROWS rows, dense_ms for DENSE_ROWS). NEVER when a kernel row costs
    no more than a dense one."""
    kernel_row, dense_row = kernel_ms / PREFILL_ROWS, dense_ms / DENSE_ROWS
    if kernel_row <= dense_row:
        return NEVER
    return max(2, math.ceil(expand_ms / (kernel_row - dense_row)))


def int4_available() -> bool:
    n, k = SHAPE
    return n % cpu_quant.BLOCK_N == 0 and k % cpu_quant.GROUP == 0


@functools.cache
def measure() -> KernelChoice:
    start = time.perf_counter()
    n, k = SHAPE
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    xp = torch.randn(PREFILL_ROWS, k, generator=gen).to(torch.bfloat16)
    xd = torch.randn(DENSE_ROWS, k, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        decode, prefill = int8_and_dense_figures(x1, xp, xd)
        if int4_available():
            dtype = dense_dtype(prefill)
            int4_decode, int4_prefill = int4_figures(x1, xp, prefill[dtype], dtype)
            decode.update(int4_decode)
            prefill.update(int4_prefill)
    int8_kernel = fastest_int8(decode, prefill)
    dtype = dense_dtype(prefill)
    thresholds = {
        # the int8 GEMMs multiply prompts at the speed of the int8 units: they never expand
        8: NEVER if int8_kernel != "torch" or "expand-int8" not in prefill else dense_threshold(
            prefill["int8-torch"], prefill[dtype], prefill["expand-int8"]),
        4: NEVER if "expand-int4" not in prefill else dense_threshold(prefill["int4"], prefill[dtype],
                                                                      prefill["expand-int4"]),
    }
    choice = KernelChoice(int8=int8_kernel, dense_from_tokens=thresholds, dense_dtype=dtype,
                          decode_ms={key: round(v, 2) for key, v in decode.items()},
                          prefill_ms={key: round(v, 1) for key, v in prefill.items()},
                          seconds=round(time.perf_counter() - start, 2))
    log.info("CPU kernels measured in %.1f s: 8-bit on %s; one token per %dx%d matrix (ms) %s; prompts expand "
             "the weights (to %s) from %s tokens", choice.seconds, int8_kernel, n, k, choice.decode_ms, dtype,
             {bits: "never" if rows == NEVER else rows for bits, rows in thresholds.items()})
    return choice


def fastest_int8(decode: dict[str, float], prefill: dict[str, float]) -> str:
    """Of the int8 kernels within DECODE_MARGIN of the fastest at decode, the fastest at prompts."""
    kernels = [key.removeprefix("int8-") for key in decode if key.startswith("int8-")]
    fastest = min(decode[f"int8-{k}"] for k in kernels)
    return min((k for k in kernels if decode[f"int8-{k}"] <= DECODE_MARGIN * fastest),
               key=lambda k: prefill[f"int8-{k}"])


def int8_and_dense_figures(x1: torch.Tensor, xp: torch.Tensor, xd: torch.Tensor) -> tuple[dict, dict]:
    """int8 on torch's kernel and on each exact int8 GEMM, and the bfloat16 matmul: (decode, prefill) ms."""
    n, k = SHAPE
    first = torch.full((n, k), 3, dtype=torch.int8)  # (the values do not change a kernel's speed)
    int8 = [first] + [first.clone() for _ in range(COPIES - 1)]
    scales = torch.full((n,), 0.01, dtype=torch.bfloat16)
    decode = {"int8-torch": median_ms(lambda i: torch.ops.aten._weight_int8pack_mm(x1, int8[i], scales),
                                      DECODE_TRIES)}
    prefill = {"int8-torch": prefill_ms(lambda i: torch.ops.aten._weight_int8pack_mm(xp, int8[i], scales))}
    for kernel in int8_gemm.usable():
        packed = [int8_gemm.PackedInt8(kernel, q, scales) for q in int8]
        decode[f"int8-{kernel}"] = median_ms(lambda i, packed=packed: packed[i](x1), DECODE_TRIES)
        prefill[f"int8-{kernel}"] = prefill_ms(lambda i, packed=packed: packed[i](xp))
        del packed
    dense = [q.to(torch.bfloat16) for q in int8]
    decode["bfloat16"] = median_ms(lambda i: F.linear(x1, dense[i]), DECODE_TRIES)
    prefill["bfloat16"] = prefill_ms(lambda i: F.linear(xd, dense[i]), tries=1)  # (DENSE_ROWS rows)
    prefill["float32"] = float32_prefill_ms(dense[0], xd)
    dtype = dense_dtype(prefill)
    if prefill["int8-torch"] / PREFILL_ROWS > prefill[dtype] / DENSE_ROWS:  # else expanding can never pay off
        prefill["expand-int8"] = prefill_ms(lambda i: int8[i].to(DTYPES[dtype]).mul_(scales[:, None]))
    return decode, prefill


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def float32_prefill_ms(weight: torch.Tensor, x: torch.Tensor) -> float:
    """CPUs without bfloat16 units (plain AVX2) multiply float32 faster than bfloat16."""
    wide, x = weight.float(), x.float()
    return prefill_ms(lambda i: F.linear(x, wide), tries=1)


def dense_dtype(prefill: dict[str, float]) -> str:
    """The dtype whose matmul runs prompt rows faster here."""
    return "float32" if prefill.get("float32", math.inf) < prefill["bfloat16"] else "bfloat16"


def int4_figures(x1: torch.Tensor, xp: torch.Tensor, dense_prefill_ms: float, dtype: str) -> tuple[dict, dict]:
    """torch's int4 kernel: (decode, prefill) ms, with the expansion where the matmul is faster per row."""
    n, k = SHAPE
    first = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.full((n, k), 7, dtype=torch.int32), 1)
    packed = [first] + [first.clone() for _ in range(COPIES - 1)]
    scales_zeros = torch.full((k // cpu_quant.GROUP, n, 2), 0.01, dtype=torch.bfloat16)

    def int4(x, i):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[i], cpu_quant.GROUP, scales_zeros)

    decode = {"int4": median_ms(lambda i: int4(x1, i), DECODE_TRIES)}
    prefill = {"int4": prefill_ms(lambda i: int4(xp, i))}
    cheaper = prefill["int4"] / PREFILL_ROWS > dense_prefill_ms / DENSE_ROWS
    if cheaper and cpu_quant.int4_block_rows() is not None:
        prefill["expand-int4"] = prefill_ms(lambda i: cpu_quant.dequantize_int4(packed[i], scales_zeros)
                                            .to(DTYPES[dtype]))
    return decode, prefill

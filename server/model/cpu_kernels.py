"""Which CPU kernels run the quantized weights on this machine, chosen by timing them at the real model's size.

The right choice depends on the CPU, and guessing from its name has failed before: FBGEMM's and oneDNN's int8
GEMMs sum 8-bit activations exactly with VNNI/AMX and saturate without (int8_gemm.activation_bits); FBGEMM reads
weights near the memory's speed where oneDNN did not on an AMD Zen 4, and the other way round with AMX; bfloat16
matmuls are fast with AMX or
AVX512-BF16 and ~3x slower than torch's int8 kernel on plain AVX2, where expanding int8 weights to bfloat16 for a
prompt only costs time. So each candidate is timed on the real thing, each figure the median of several tries:

- decode: one token through the matrices of one ChatGLM2-6B layer, all six of their shapes (204 M weights; the
  candidates run in interleaved rounds, so between two runs of one the others pass 0.7 GB or more through the cache,
  more than a server CPU's last level holds: 300 MiB on an Emerald Rapids), on each kernel (int8 on torch's kernel, on
  FBGEMM's and oneDNN's GEMMs where exact, int4 on torch's kernel and on the VNNI one (int4_vnni.py) where it
  runs, and the bfloat16 matmul): lets `auto` pick the fastest precision
  that fits the RAM. (One MLP-sized matrix measured alone ranked int4 ahead of FBGEMM's int8 by 20 %; in the
  model FBGEMM's 8-bit decoded faster: the small K/V matrices and the 13,696-wide one weigh in.);
- the int8 kernel (and the int4 one alike): among those within DECODE_MARGIN of the fastest at decode, the
  fastest at PREFILL_ROWS rows
  (two int8 kernels often decode within a few % of each other, and a prompt of 20 tokens then costs 3 times
  more on one than the other: the margin keeps noise from deciding);
- prefill (compute-bound: one matrix, the layer's down projection): PREFILL_ROWS tokens through each kernel,
  DENSE_ROWS through the bfloat16 and the float32 matmul (the
  faster is the dense dtype: float32 on CPUs without bfloat16 units), and (where the matmul's rows are cheaper)
  the cost of expanding one matrix: from how many tokens expanding pays off. Never where a kernel row costs no
  more than a matmul row: then every prompt runs on the kernel, with no per-forward expansion.

It takes a few seconds, once per process (`measure()` is cached). The figures are logged and shown in /health.

Where two int8 kernels measure close to each other, a pick made afresh at every start trades places between
starts (emulated consumer Intel: FBGEMM decodes ~10 % faster, oneDNN runs prompts 1.5 x faster), and with it the
prompts' speed and the disk prompt cache's fingerprint, which empties that cache. So the model folder keeps the
last start's int8 kernel (`KERNEL_RECORD`, with what the measurement depends on: the CPU, torch, threads, ISA
caps), and `settled_int8` keeps it while this start's figures still allow it within KEEP_MARGIN.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cpu_quant, int4_vnni, int8_gemm

log = logging.getLogger(__name__)

# one ChatGLM2-6B layer's linear layers as (out, in): q, k, v, o, gate_up, down
LAYER = ((4096, 4096), (256, 4096), (256, 4096), (4096, 4096), (27392, 4096), (4096, 13696))
PROMPT_MATRIX = LAYER[-1]  # 56 M weights, where prompts are timed
DECODE_TRIES = 7
PREFILL_ROWS = 32  # a kernel's cost grows about linearly with the rows: 32 tell its cost per row
DENSE_ROWS = 128  # a dense matmul gets cheaper per row as rows grow: measured where long prompts run
PREFILL_TRIES = 3
DECODE_MARGIN = 1.1
KEEP_MARGIN = 1.1  # the last start's int8 kernel stays while within this much more of the figures it was picked by
KERNEL_RECORD = "cpu-kernels.json"  # in the model folder
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")
NEVER = sys.maxsize


@dataclass(frozen=True)
class KernelChoice:
    int8: str  # "torch", "fbgemm" or "onednn": which kernel runs 8-bit weights
    dense_from_tokens: dict[int, int]  # bits -> rows from which a prompt expands the weights (NEVER: it does not)
    dense_dtype: str = "bfloat16"  # what they expand to: bfloat16, or float32 where its matmul is faster
    decode_ms: dict[str, float] = field(default_factory=dict)  # one token through one layer, by candidate
    prefill_ms: dict[str, float] = field(default_factory=dict)  # PREFILL_ROWS tokens, and expanding one matrix
    seconds: float = 0.0  # what measuring took
    int4: str = "torch"  # "torch" or "vnni" (int4_vnni.py): which kernel runs 4-bit weights

    def decode_ms_at(self, bits: int) -> float | None:
        """The chosen kernel's time per layer for one token at this precision (16: the bfloat16 matmul)."""
        return self.decode_ms.get("bfloat16" if bits == 16 else kernel_key(bits, self.int8, self.int4))

    def prompt_ms_at(self, bits: int) -> float | None:
        """The chosen kernel's time for PREFILL_ROWS prompt tokens through PROMPT_MATRIX (4 and 8 bits)."""
        return self.prefill_ms.get(kernel_key(bits, self.int8, self.int4)) if bits in (4, 8) else None

    def as_dict(self) -> dict:
        """What /health shows."""
        return {"int8": self.int8, "int4": self.int4, "dense_dtype": self.dense_dtype,
                "dense_from_tokens": {str(bits): None if rows == NEVER else rows
                                      for bits, rows in self.dense_from_tokens.items()},
                "decode_ms": self.decode_ms, "prefill_ms": self.prefill_ms, "measured_in_s": self.seconds}


INT4_KEYS = {"torch": "int4", "vnni": "int4-vnni"}  # the figures' names of each int4 kernel


def kernel_key(bits: int, int8: str, int4: str) -> str:
    """The name of a quantized kernel's figures: int8-<kernel>, int4, int4-vnni."""
    return f"int8-{int8}" if bits == 8 else INT4_KEYS[int4]


def expand_key(bits: int, int4: str) -> str:
    """The name of the figure for expanding one matrix of those weights (the int8 kernels share one layout)."""
    return "expand-int8" if bits == 8 else f"expand-{INT4_KEYS[int4]}"


def median_ms(run: Callable[[], object], tries: int) -> float:
    """Median over `tries` of the time of run() (after one warm call)."""
    run()
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def decode_ms(runs: dict[str, Callable[[], object]], tries: int = DECODE_TRIES) -> dict[str, float]:
    """Median ms of each run, taken in rounds that time every candidate once: a shared machine's load drifts
    within seconds (±20 % on 2 shared cores), and timing one candidate after the other would hand that drift
    to the comparison."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(tries):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def dense_threshold(kernel_ms: float, dense_ms: float, expand_ms: float) -> int:
    """Rows from which expanding then multiplying densely beats the kernel: expand + rows x dense-row <
    rows x kernel-row (kernel_ms for PREFILL_ROWS rows, dense_ms for DENSE_ROWS). NEVER when a kernel row costs
    no more than a dense one."""
    kernel_row, dense_row = kernel_ms / PREFILL_ROWS, dense_ms / DENSE_ROWS
    if kernel_row <= dense_row:
        return NEVER
    return max(2, math.ceil(expand_ms / (kernel_row - dense_row)))


def int4_available() -> bool:
    return all(n % cpu_quant.BLOCK_N == 0 and k % cpu_quant.GROUP == 0 for n, k in LAYER)


class Inputs:
    """Activations for one decoding token (per input width) and for prompts through PROMPT_MATRIX."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.one = {k: torch.randn(1, k, generator=gen).to(torch.bfloat16) for k in {k for _, k in LAYER}}
        k = PROMPT_MATRIX[1]
        self.prompt = torch.randn(PREFILL_ROWS, k, generator=gen).to(torch.bfloat16)
        self.dense = torch.randn(DENSE_ROWS, k, generator=gen).to(torch.bfloat16)

    def decode(self, matmul: Callable, weights: list) -> Callable[[], object]:
        """One token through the layer: matmul(x, weight) for each of LAYER's matrices (timed by decode_ms)."""
        return lambda: [matmul(self.one[k], w) for (_, k), w in zip(LAYER, weights)]

    def prefill(self, matmul: Callable, weight, rows: torch.Tensor | None = None, tries: int = PREFILL_TRIES):
        x = self.prompt if rows is None else rows
        return median_ms(lambda: matmul(x, weight), tries)


@functools.cache
def measure() -> KernelChoice:
    start = time.perf_counter()
    inputs = Inputs()
    with torch.inference_mode():
        runs, prefill = int8_and_dense_figures(inputs)
        if int4_available():
            dtype = dense_dtype(prefill)
            int4_run, int4_prefill = int4_figures(inputs, prefill[dtype], dtype)
            runs.update(int4_run)
            prefill.update(int4_prefill)
        decode = decode_ms(runs)  # (every candidate's weights held at once: ~1.1 GB for a few seconds)
        del runs
    int8_kernel = fastest(decode, prefill, [key for key in decode if key.startswith("int8-")]).removeprefix("int8-")
    int4_key = fastest(decode, prefill, INT4_KEYS.values()) or INT4_KEYS["torch"]
    int4_kernel = next(kernel for kernel, key in INT4_KEYS.items() if key == int4_key)
    dtype = dense_dtype(prefill)
    thresholds = {bits: dense_from(bits, int8_kernel, int4_kernel, prefill, dtype) for bits in (8, 4)}
    choice = KernelChoice(int8=int8_kernel, int4=int4_kernel, dense_from_tokens=thresholds, dense_dtype=dtype,
                          decode_ms={key: round(v, 2) for key, v in decode.items()},
                          prefill_ms={key: round(v, 1) for key, v in prefill.items()},
                          seconds=round(time.perf_counter() - start, 2))
    log.info("CPU kernels measured in %.1f s: 8-bit on %s, 4-bit on %s; one token through a 6B layer (ms) %s; "
             "prompts expand the weights (to %s) from %s tokens", choice.seconds, int8_kernel, int4_kernel,
             choice.decode_ms, dtype, {bits: "never" if rows == NEVER else rows for bits, rows in thresholds.items()})
    return choice


def dense_from(bits: int, int8: str, int4: str, prefill: dict[str, float], dtype: str) -> int:
    """From how many prompt rows weights of `bits` on the chosen kernel expand: where the measured expansion pays
    (NEVER where it was not measured); the int8 GEMMs multiply prompts at the speed of the int8 units and never do."""
    expand = prefill.get(expand_key(bits, int4))
    if (bits == 8 and int8 != "torch") or expand is None:
        return NEVER
    return dense_threshold(prefill[kernel_key(bits, int8, int4)], prefill[dtype], expand)


def fastest_int8_decode_ms(decode: dict[str, float]) -> float:
    return min(ms for key, ms in decode.items() if key.startswith("int8-"))


def fastest(decode: dict[str, float], prefill: dict[str, float], keys) -> str | None:
    """Of the kernels named `keys` (those measured), those within DECODE_MARGIN of the fastest at decode, the
    fastest at prompts; None when none was measured."""
    measured = [key for key in keys if key in decode]
    if not measured:
        return None
    quickest = min(decode[key] for key in measured)
    return min((key for key in measured if decode[key] <= DECODE_MARGIN * quickest), key=lambda key: prefill[key])


def int8_and_dense_figures(inputs: Inputs) -> tuple[dict, dict]:
    """int8 on torch's kernel and on each exact int8 GEMM, and the bfloat16 matmul: (decode runs, prefill ms)."""
    int8 = [torch.full(shape, 3, dtype=torch.int8) for shape in LAYER]  # (the values do not change the speed)
    scales = [torch.full((n,), 0.01, dtype=torch.bfloat16) for n, _ in LAYER]
    torch_int8 = list(zip(int8, scales))

    def on_torch(x, weight):
        return torch.ops.aten._weight_int8pack_mm(x, *weight)

    decode = {"int8-torch": inputs.decode(on_torch, torch_int8)}
    prefill = {"int8-torch": inputs.prefill(on_torch, torch_int8[-1])}
    for kernel in int8_gemm.usable():
        packed = packed_layer(kernel, torch_int8)
        decode[f"int8-{kernel}"] = inputs.decode(lambda x, w: w(x), packed)
        prefill[f"int8-{kernel}"] = inputs.prefill(lambda x, w: w(x), packed[-1])
    dense = [q.to(torch.bfloat16) for q in int8]
    decode["bfloat16"] = inputs.decode(F.linear, dense)
    prefill["bfloat16"] = inputs.prefill(F.linear, dense[-1], inputs.dense, tries=1)  # (DENSE_ROWS rows)
    prefill["float32"] = inputs.prefill(F.linear, dense[-1].float(), inputs.dense.float(), tries=1)
    dtype = dense_dtype(prefill)
    if prefill["int8-torch"] / PREFILL_ROWS > prefill[dtype] / DENSE_ROWS:  # else expanding can never pay off
        q, scale = torch_int8[-1]
        prefill["expand-int8"] = median_ms(lambda: cpu_quant.dequantize_int8(q, scale, DTYPES[dtype], reuse=True),
                                           PREFILL_TRIES)
    return decode, prefill


def packed_layer(kernel: str, weights: list) -> list[int8_gemm.PackedInt8]:
    """The layer's int8 matrices in an int8 GEMM's layout (~1 s for FBGEMM's, on this thread: the measurement
    runs in every start, also of servers that never use it)."""
    return [int8_gemm.PackedInt8(kernel, *w) for w in weights]


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def dense_dtype(prefill: dict[str, float]) -> str:
    """The dtype whose matmul runs prompt rows faster here (float32 on CPUs without bfloat16 units)."""
    return "float32" if prefill.get("float32", math.inf) < prefill["bfloat16"] else "bfloat16"


def int4_figures(inputs: Inputs, dense_prefill_ms: float, dtype: str) -> tuple[dict, dict]:
    """torch's int4 kernel, and the VNNI kernel where it runs: (decode runs, prefill ms), with the expansion where
    the matmul is faster per row."""
    weights = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.full(shape, 7, dtype=torch.int32), 1),
                torch.full((shape[1] // cpu_quant.GROUP, shape[0], 2), 0.01, dtype=torch.bfloat16))
               for shape in LAYER]

    def int4(x, weight):
        packed, scales_zeros = weight
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, cpu_quant.GROUP, scales_zeros)

    decode = {"int4": inputs.decode(int4, weights)}
    prefill = {"int4": inputs.prefill(int4, weights[-1])}
    expand = {"int4": lambda: cpu_quant.dequantize_int4(*weights[-1], DTYPES[dtype], reuse=True)}
    if cpu_quant.int4_block_rows() is None:
        expand = {}
    if int4_vnni.available():
        vnni = [int4_vnni.PackedInt4(*w) for w in weights]
        decode["int4-vnni"] = inputs.decode(lambda x, w: w(x), vnni)
        prefill["int4-vnni"] = inputs.prefill(lambda x, w: w(x), vnni[-1])
        expand["int4-vnni"] = lambda: vnni[-1].dense(DTYPES[dtype], reuse=True)
    for key, run in expand.items():
        if prefill[key] / PREFILL_ROWS > dense_prefill_ms / DENSE_ROWS:  # else expanding never pays off
            prefill[f"expand-{key}"] = median_ms(run, PREFILL_TRIES)
    return decode, prefill


# -- the last start's int8 kernel ----------------------------------------------------------------------------------
def machine() -> dict:
    """What the measurement depends on besides noise: the CPU, torch and its threads, and the ISA caps in effect."""
    name = platform.processor() or platform.machine()
    try:  # Linux names the model there (platform.processor() says only "x86_64")
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "caps": {cap: os.environ[cap] for cap in ISA_CAPS if cap in os.environ}}


def keeps(choice: KernelChoice, previous: str) -> bool:
    """Whether this start's figures still allow the last start's int8 kernel: within DECODE_MARGIN x KEEP_MARGIN
    of the fastest at decode, and within KEEP_MARGIN of this start's pick at prompts."""
    decode, prefill = choice.decode_ms, choice.prefill_ms
    key = f"int8-{previous}"
    if key not in decode or key not in prefill:  # not usable here any more
        return False
    return (decode[key] <= DECODE_MARGIN * KEEP_MARGIN * fastest_int8_decode_ms(decode)
            and prefill[key] <= KEEP_MARGIN * prefill[f"int8-{choice.int8}"])


def settled_int8(choice: KernelChoice, folder: Path) -> str:
    """The int8 kernel for this start: the last one's on this machine (`folder`/KERNEL_RECORD) while this start's
    figures still allow it (`keeps`), else this start's pick; the one taken is recorded for the next start (a
    read-only folder keeps nothing: each start picks afresh)."""
    record = folder / KERNEL_RECORD
    here = machine()
    try:
        last = json.loads(record.read_text(encoding="utf-8"))
        previous = last["int8"] if last.get("machine") == here else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: pick afresh
        previous = None
    kernel = previous if previous is not None and keeps(choice, previous) else choice.int8
    if kernel != choice.int8:
        log.info("8-bit stays on %s, the last start's int8 kernel: this start's figures allow it (pick: %s)",
                 kernel, choice.int8)
    try:
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": here, "int8": kernel}), encoding="utf-8")
        os.replace(tmp, record)
    except OSError as exc:
        log.debug("the int8 kernel is not kept for the next start: %s", exc)
    return kernel

"""Quantized weights for the CPU, computed once and cached by convert.py, so a later start loads them as they are.

- int8 and int4 linear layers on the quantized matmul kernels that ship with torch (no extra package, no
  compiler). int8: symmetric per output row (w = q * scale), multiplied by torch's `aten._weight_int8pack_mm`
  (bfloat16 activations) or by FBGEMM's or oneDNN's int8 GEMM on integer activations quantized in two passes
  (int8_gemm.py) where that is exact; cpu_kernels.py times them at load. int4: `aten._weight_int4pack_mm_for_cpu`,
  asymmetric groups of GROUP weights along K with a bfloat16 scale and zero each (w = (q - 8) * scale + zero,
  ~4.5 bits per weight); where the CPU has VNNI, int4_vnni.py's kernel with int8 activations (repacked at load,
  where cpu_kernels.py measures it faster).
- bitsandbytes' NF4 in transformers' own serialized form (nf4_tensors), `--cpu-kernels bnb` at 4-bit: from the
  cache, from_pretrained needs no quantizing at every start.

Decoding multiplies one token's activations by each matrix, which the kernels do while reading the compact
weights. A prompt of many tokens is compute-bound instead: where the CPU's bfloat16 matmul is faster per row
than the kernel (AMX, AVX512-BF16), a layer expands its weights to bfloat16 one matrix at a time, into memory the
thread keeps until it idles (scratch), for prompts of `dense_from_tokens` rows or more; cpu_kernels.py measures
from how many rows that pays off, and on CPUs without fast bfloat16 (plain AVX2) it never does. Figures:
docs/performance.md.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .int8_gemm import PackedInt8

GROUP = 32  # int4 weights per scale/zero pair along K
BLOCK_N = 64  # the int4 packer lays out blocks of this many output rows with AVX512 (half as many with AVX2)
# Until cpu_kernels.py has measured this CPU: from this many rows a prompt expands the weights to bfloat16 (what
# an AVX512-BF16/AMX CPU measured); the loader sets each layer's own threshold from the measurement.
DENSE_FROM_TOKENS = {8: 32, 4: 128}


def int4_fits(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return n % BLOCK_N == 0 and k % GROUP == 0


@functools.cache
def int4_block_rows() -> torch.Tensor | None:
    """Which row of a packed block each nibble holds, for one k (low nibble of each byte first); its length is
    the block's rows: 64 with AVX512 (byte j holds rows j and 32 + j), 32 with AVX2 (rows j and 16 + j).

    The packed layout is torch's and depends on the CPU's vector width, so the packer itself is asked, with one
    64x2 probe. None when it is no such block layout: prefill then runs on the int4 kernel too.
    """
    rows = torch.arange(BLOCK_N, dtype=torch.int32)

    def nibbles(values: torch.Tensor) -> torch.Tensor:  # the probe's packed nibbles, in memory order
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values[:, None].repeat(1, 2), 1)
        return torch.stack((packed.reshape(-1) & 15, packed.reshape(-1) >> 4), dim=-1).reshape(-1).long()

    order = nibbles(rows % 16) + 16 * nibbles(rows // 16)
    for block in (BLOCK_N, BLOCK_N // 2):  # the first k of the first block fills its first `block` nibbles
        if torch.equal(order[:block].sort().values, torch.arange(block)):
            return order[:block]
    return None


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (packed uint8 [N, K/2] in the kernel's layout, scales_and_zeros bf16 [K/G, N, 2])."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def dequantize_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                    reuse: bool = False) -> torch.Tensor:
    """The [N, K] weight in `dtype` back from the kernel's layout: blocks of 64 rows, and for each k 32 bytes
    holding the block's rows in int4_block_rows() order. With `reuse`, in this thread's scratch memory
    (the result lasts until the thread's next expansion).

    It is written as W^T ([K, N], returned as its transposed view, which F.linear takes as it is): each k's bytes
    then land side by side, where a row-major W would scatter every nibble K elements apart; the scales are
    made contiguous first for the same reason. (1.3-2x faster per 6B matrix; scratch memory, whose pages are
    already mapped, halves a prompt's expansion again: docs/performance.md.)"""
    n, k = packed.shape[0], packed.shape[1] * 2
    order = int4_block_rows()
    if order is None:  # a layout not read here (no AVX2): the kernel itself multiplies the identity (slow, exact)
        eye = torch.eye(k, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, GROUP, scales_zeros).t().to(dtype)
    block = len(order)
    bytes_by_k = packed.view(n // block, k, block // 2).transpose(0, 1)  # [K, N / block, block / 2]
    nibbles = expansion_memory(n * k // 2, torch.uint8, reuse).view(n // block, k, block // 2).transpose(0, 1)
    w_t = expansion_memory(n * k, dtype, reuse).view(k, n // block, 2, block // 2)
    w_t[:, :, 0].copy_(torch.bitwise_and(bytes_by_k, 15, out=nibbles))  # the low nibbles, then the high ones
    w_t[:, :, 1].copy_(torch.bitwise_right_shift(bytes_by_k, 4, out=nibbles))
    rows = order.view(block // 2, 2).t().reshape(-1)  # the row each column of a block now holds
    if not torch.equal(rows, torch.arange(block)):  # another nibble order: put rows in place (slower, still right)
        w_t = w_t.view(k, n // block, block).index_select(2, rows.argsort())
    scale, zero = (scales_zeros[..., i].to(dtype).contiguous() for i in (0, 1))  # [K/G, N] each
    w_t = w_t.view(k // GROUP, GROUP, n)
    return torch.addcmul((zero - 8 * scale)[:, None], w_t, scale[:, None], out=w_t).view(k, n).t()


_scratch = threading.local()
_scratch_bytes = [0]  # alive in all threads (a buffer's finalizer takes its bytes off)
_scratch_lock = threading.Lock()


def scratch(size: int, dtype: torch.dtype) -> torch.Tensor:
    """`size` elements of memory this thread keeps for expanding weights (one buffer per dtype, grown to the
    largest matrix: ~280 MB at 4-bit for ChatGLM2-6B) until release_scratch(). A fresh 6B-matrix-sized tensor
    costs more to map in, page by page, than the expansion itself. Per thread, so two engines' workers never
    share one (and a thread's buffers go when it ends)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < size:
        buffers.pop(dtype, None)  # (released before the larger one is made)
        with torch.inference_mode(False):  # (an inference tensor could not be written outside inference mode)
            buffer = torch.empty(size, dtype=dtype)
        count_scratch(buffer.nbytes)
        weakref.finalize(buffer, count_scratch, -buffer.nbytes)
        buffers[dtype] = buffer
    return buffers[dtype][:size]


def expansion_memory(size: int, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
    """`size` elements to expand weights into: this thread's scratch with `reuse`, else a fresh tensor."""
    return scratch(size, dtype) if reuse else torch.empty(size, dtype=dtype)


def release_scratch() -> None:
    """Give this thread's scratch memory back (the engine's worker does when it has nothing to do)."""
    _scratch.__dict__.pop("buffers", None)


def scratch_bytes() -> int:
    """Scratch memory held by all threads."""
    return _scratch_bytes[0]


def count_scratch(change: int) -> None:
    with _scratch_lock:
        _scratch_bytes[0] += change


def dequantize_int8(weight_int8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    reuse: bool = False) -> torch.Tensor:
    """W = q * scale per row in `dtype`; with `reuse`, in this thread's scratch memory (see dequantize_int4)."""
    w = expansion_memory(weight_int8.numel(), dtype, reuse)
    return w.view(weight_int8.shape).copy_(weight_int8).mul_(scales.to(dtype)[:, None])


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (int8 [N, K], bf16 scales [N])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W quantized; subclasses hold W's buffers (filled by load_state_dict(assign=True)) and
    multiply by it: with the quantized kernel for a few tokens, with W expanded to bfloat16 for many."""

    dense_from_tokens: int
    dense_dtype = torch.bfloat16  # what the weights expand to for prompts: float32 where bfloat16 is slow

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Buffer(torch.empty(out_features, dtype=torch.bfloat16, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x.shape[0] >= self.dense_from_tokens:
            y = F.linear(x.to(self.dense_dtype), self.dense_weight()).to(torch.bfloat16)
        else:
            y = self.kernel(x)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def expands_from_rows(model: nn.Module) -> int:
    """The fewest prompt rows from which any of the model's quantized layers expands its weights (sys.maxsize:
    none does, or it has none)."""
    return min((m.dense_from_tokens for m in model.modules() if isinstance(m, QuantizedLinear)), default=sys.maxsize)


class Int4Linear(QuantizedLinear):
    """W in 4 bits, groups of GROUP along K (see module doc)."""

    dense_from_tokens = DENSE_FROM_TOKENS[4]

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.weight_int4 = nn.Buffer(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.scales_zeros = nn.Buffer(torch.empty(in_features // GROUP, out_features, 2, dtype=torch.bfloat16,
                                                  device=device))
        self.packed = None  # W in the VNNI kernel's layout (int4_vnni.PackedInt4; see pack)
        if int4_block_rows() is None:  # a packed layout dequantize_int4 cannot read: the kernel does all
            self.dense_from_tokens = sys.maxsize

    def loaded(self) -> bool:
        """Whether W has loaded in torch's layout (and is not packed yet)."""
        return self.weight_int4 is not None and not (self.weight_int4.is_meta or self.scales_zeros.is_meta)

    def pack(self, kernel: str) -> None:
        """Hand W to the 4-bit VNNI kernel (kernel "vnni", int4_vnni.py) in its own layout, made at load, and release
        torch's copy (cpu_kernels.py decides where that kernel is the faster)."""
        from .int4_vnni import PackedInt4

        assert kernel == "vnni", kernel
        self.packed = PackedInt4(self.weight_int4, self.scales_zeros)
        self.weight_int4 = self.scales_zeros = None

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4, GROUP, self.scales_zeros)

    def dense_weight(self) -> torch.Tensor:
        """W in the dense dtype (bfloat16, or float32 where that is the faster matmul)."""
        if self.packed is not None:
            return self.packed.dense(self.dense_dtype, reuse=True)
        return dequantize_int4(self.weight_int4, self.scales_zeros, self.dense_dtype, reuse=True)


class Int8Linear(QuantizedLinear):
    """W in 8 bits per output row (see module doc)."""

    dense_from_tokens = DENSE_FROM_TOKENS[8]

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.weight_int8 = nn.Buffer(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.scales = nn.Buffer(torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.packed: PackedInt8 | None = None  # W in an int8 GEMM's own layout (see pack)

    def loaded(self) -> bool:
        """Whether W has loaded as int8 (and is not packed yet)."""
        return self.weight_int8 is not None and not (self.weight_int8.is_meta or self.scales.is_meta)

    def pack(self, kernel: str) -> None:
        """Hand W to an int8 GEMM with integer activations (int8_gemm.py) in its own layout, which depends on the
        CPU (so it is made at load, not cached), and release the int8 buffer, whose copy it is. Only where that
        GEMM is exact and the faster kernel (cpu_kernels.py decides)."""
        self.packed = PackedInt8(kernel, self.weight_int8, self.scales)
        self.weight_int8 = None  # the mapped (or loaded) int8 copy is no longer needed
        self.dense_from_tokens = sys.maxsize  # the int8 GEMMs beat expanding W at every size

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return self.packed(x)

    def dense_weight(self) -> torch.Tensor:
        """W in the dense dtype (bfloat16, or float32 where that is the faster matmul)."""
        return dequantize_int8(self.weight_int8, self.scales, self.dense_dtype, reuse=True)


def quantized_tensors(name: str, weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """The cache entries for the weight `<module>.weight` of a linear layer at 4 or 8 bits (8 for a shape the
    int4 packer lays out otherwise)."""
    module = name.removesuffix(".weight")
    if bits == 4 and int4_fits(weight):
        packed, scales_zeros = quantize_int4(weight)
        return {f"{module}.weight_int4": packed, f"{module}.scales_zeros": scales_zeros}
    q, scale = quantize_int8(weight)
    return {f"{module}.weight_int8": q, f"{module}.scales": scale}


# transformers' own serialization of a bitsandbytes 4-bit model (what save_pretrained writes): from_pretrained
# then loads the cache as it is instead of quantizing 12.5 GB at every start
NF4_BLOCK = 64
NF4_CONFIG = {
    "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8",
    "llm_int8_skip_modules": ["lm_head"],
}


def nf4_tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cache entries of a linear layer's weight in bitsandbytes NF4: the packed weight and its quant state."""
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(weight.to(torch.bfloat16), blocksize=NF4_BLOCK, quant_type="nf4",
                                      quant_storage=torch.uint8)
    return {name: packed, **{f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()}}


def swap_linears(model: nn.Module, state_names: set[str]) -> None:
    """Replace each nn.Linear whose quantized tensors are in the cache by the matching quantized module."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        kind = next((k for marker, k in (("weight_int4", Int4Linear), ("weight_int8", Int8Linear))
                     if f"{name}.{marker}" in state_names), None)
        if kind:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, kind(module.in_features, module.out_features, module.bias is not None,
                                        device=module.weight.device))

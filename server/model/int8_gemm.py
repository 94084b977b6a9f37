"""int8 GEMMs with integer activations on the CPU: oneDNN's and FBGEMM's, both built into torch (no extra package,
no compiler, Linux and Windows).

Each multiplies u8 activations by s8 weights in its own packed copy of W (made at load: the layout depends on the
CPU) and returns float32. Activations are quantized twice per row (int8_activations): the row, then what its
rounding lost. That keeps ~16 bits per value, so an outlier channel (ChatGLM2 has some) costs the rest of its row
no precision, and it costs the GEMM little: it reads the weights once for all 2M rows.

Without VNNI (plain AVX2: older Intel, AMD before Zen 4) both add pairs of u8 x s8 products in int16, which
saturates with 8-bit activations. Each kernel is probed for the widest activations it sums exactly here: 8 bits
(zero point 128), or 7 bits (values 1..127, zero point 64: a pair stays below 2^15), or none. With 7 bits the two
passes still keep ~14 bits per value.
"""

from __future__ import annotations

import functools
import warnings

import torch

KERNELS = ("fbgemm", "onednn")
ROWS = 128  # activation rows per call: fastest on the 6B shapes (they stay in cache)
ZERO_POINT = {8: 128, 7: 64}


def int8_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (float32 [2M, K] holding integers in ±(2^(bits-1) - 1), scales s1 [M, 1], s2 [M, 1]).

    Rows 0..M-1 are x in steps of s1 = max|x_row| / top; rows M..2M-1 are what that rounding lost (at most
    s1 / 2), in steps of s2 = s1 / (2 top). x = s1 q1 + s2 q2 to within s2 / 2: about 16 bits per value at
    8 bits (top 127), 14 at 7 (top 63).
    """
    top = 2 ** (bits - 1) - 1
    m = x.shape[0]
    x = x.float()
    s1 = x.abs().amax(-1, keepdim=True).clamp_(min=1e-30).div_(top)
    both = torch.empty(2 * m, x.shape[1])
    q1 = torch.div(x, s1, out=both[:m]).round_()
    s2 = s1 / (2 * top)
    torch.div(x.addcmul_(q1, s1, value=-1), s2, out=both[m:]).round_().clamp_(-top, top)
    return both, s1, s2


def fbgemm_pack(weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """W (s8 [N, K], one scale per row) in FBGEMM's layout. FBGEMM takes W as a quantized tensor, a form torch
    marks deprecated (the warning is silenced here; fbgemm_available() tells when it is gone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(weight_int8, scales.double(),
                                                     torch.zeros(weight_int8.shape[0], dtype=torch.long), 0)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(q, None)
        finally:
            torch.backends.quantized.engine = engine


def fbgemm_matmul(q: torch.Tensor, bits: int, packed: torch.ScriptObject) -> torch.Tensor:
    """float32 [M, N] = (q as u8 with its zero point) x W^T x W's scales; q holds integers already, which FBGEMM
    quantizes with scale 1 to exactly themselves."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, ZERO_POINT[bits], packed)


def onednn_pack(weight_int8: torch.Tensor, scales: torch.Tensor) -> tuple:
    n, k = weight_int8.shape
    return (torch.ops.onednn.qlinear_prepack(weight_int8, [1, k]), scales.float(), torch.zeros(n, dtype=torch.int64))


def onednn_matmul(q: torch.Tensor, bits: int, packed: tuple) -> torch.Tensor:
    weight, scales, zero_points = packed
    u8 = q.add(ZERO_POINT[bits]).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(u8, 1.0, ZERO_POINT[bits], weight, scales, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


PACK = {"fbgemm": fbgemm_pack, "onednn": onednn_pack}
MATMUL = {"fbgemm": fbgemm_matmul, "onednn": onednn_matmul}


@functools.cache
def activation_bits(kernel: str) -> int | None:
    """The widest activations `kernel` sums exactly on this CPU: 8, 7 or None (absent from this torch, or exact at
    neither). The probe multiplies 64 activations at the top of the range by weights of 127: int16 pair sums
    overflow at 8 bits without VNNI and come back ~50 % off; a real model's layers were ~6 % off (AMD Zen 3)."""
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        # (asking anyway throws a C++ exception through torch; under wine that later crashed the process)
        return None
    k = 64
    try:
        packed = PACK[kernel](torch.full((1, k), 127, dtype=torch.int8), torch.ones(1))
        for bits in (8, 7):
            top = 2 ** (bits - 1) - 1
            y = MATMUL[kernel](torch.full((1, k), float(top)), bits, packed)
            if float(y) == float(top * 127 * k):
                return bits
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def usable() -> list[str]:
    return [kernel for kernel in KERNELS if activation_bits(kernel)]


class PackedInt8:
    """One int8 weight in a kernel's packed copy: called on bfloat16 activations [M, K], returns [M, N]."""

    def __init__(self, kernel: str, weight_int8: torch.Tensor, scales: torch.Tensor):
        self.kernel, self.bits = kernel, activation_bits(kernel)
        if self.bits is None:
            raise ValueError(f"{kernel}'s int8 GEMM is not exact on this CPU")
        self.packed = PACK[kernel](weight_int8, scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()  # (the GEMMs have no gradient; a model called outside no_grad still infers)
        if x.shape[0] <= ROWS:
            return self.rows(x)
        return torch.cat([self.rows(part) for part in x.split(ROWS)])

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        q, s1, s2 = int8_activations(x, self.bits)
        y = MATMUL[self.kernel](q, self.bits, self.packed)
        m = x.shape[0]
        return y[:m].mul_(s1).add_(y[m:].mul_(s2)).to(torch.bfloat16)

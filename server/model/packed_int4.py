"""The packed 4-bit weights of THUDM/chatglm2-6b-int4, read without cpm_kernels or a compiler.

That checkpoint (config.json: `"quantization_bit": 4`) stores each linear layer of the encoder as
`<module>.weight`, int8 [N, K/2] holding two signed 4-bit values per byte, and `<module>.weight_scale` [N] (float16)
per output row: w[n, k] = int4[n, k] * scale[n]. The reference packs column 2j into the high nibble and column
2j + 1 into the low one (`(w[2j] << 4) | (w[2j+1] & 0xF)`) and unpacks with arithmetic shifts, so both nibbles
are signed, -8..7. Embeddings, norms, biases and the output layer stay float16.

convert.py pairs each weight with its scale (Int4Rows) and writes every cache format from the exact values:
float16 as the reference's own half-precision unpacking computes it, float32 exactly, and the CPU int8/int4
caches from the integers themselves (no second rounding of the weights; only the scale becomes bfloat16).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ConversionError

SCALE_SUFFIX = ".weight_scale"


def quantization_bits(config: dict) -> int | None:
    """4 for a packed int4 checkpoint, None for a float one; a ConversionError for bits this reader lacks."""
    bits = config.get("quantization_bit")
    if not bits:
        return None
    if bits != 4:
        raise ConversionError(f"config.json says quantization_bit = {bits}: only the float16 checkpoints and the "
                              "packed int4 one (chatglm2-6b-int4) can be read")
    return 4


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] of packed nibbles -> int8 [N, K] of values -8..7 (high nibble first)."""
    packed = packed.to(torch.int8)
    high = packed >> 4  # arithmetic shift: the high nibble, signed
    low = (packed << 4) >> 4  # the low nibble moved up, then shifted back with its sign
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1)


@dataclass(frozen=True)
class Int4Rows:
    """A quantized weight: values [N, K] (int8, -8..7) and one scale per row [N]."""

    values: torch.Tensor
    scale: torch.Tensor

    def split(self, sizes: list[int], dim: int = 0) -> tuple[Int4Rows, ...]:
        assert dim == 0, "rows only: each row keeps its scale"
        return tuple(Int4Rows(v, s) for v, s in zip(self.values.split(sizes), self.scale.split(sizes)))

    def clone(self) -> Int4Rows:
        return Int4Rows(self.values.clone(), self.scale.clone())

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """int4 x scale computed in `dtype`: in float16 the reference's own unpacking (each product rounded once),
        in float32 exact (a 4-bit integer times a float16 needs 14 significant bits)."""
        return self.values.to(dtype) * self.scale.to(dtype)[:, None]


class Int4Pairing:
    """Pairs each packed `<module>.weight` with its `<module>.weight_scale`, in whichever order they come."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor | Int4Rows]]:
        if name.endswith(SCALE_SUFFIX):
            weight_name = name.removesuffix("_scale")
            self.scales[weight_name] = tensor
        elif name.endswith(".weight") and tensor.dtype == torch.int8:
            weight_name = name
            self.weights[name] = tensor
        else:
            yield name, tensor
            return
        if weight_name in self.weights and weight_name in self.scales:
            packed, scale = self.weights.pop(weight_name), self.scales.pop(weight_name)
            if packed.dim() != 2 or scale.shape != (packed.shape[0],):
                raise ConversionError(f"{weight_name}: packed weight {tuple(packed.shape)} and scale "
                                      f"{tuple(scale.shape)} do not belong together")
            yield weight_name, Int4Rows(unpack(packed), scale)

    def check_complete(self) -> None:
        unpaired = sorted(self.weights) + sorted(name + "_scale" for name in self.scales)
        if unpaired:
            raise ConversionError(f"the int4 checkpoint lacks the other half of {', '.join(unpaired[:3])}: "
                                  "download it again")


def cpu_tensors(name: str, weight: Int4Rows, bits: int) -> dict[str, torch.Tensor]:
    """The CPU cache entries of a packed weight, from its integers: int8 holds them as they are; torch's int4
    kernel computes (q - 8) * scale + zero per group, so q = value + 8 with the row's scale and zero 0."""
    from .cpu_quant import GROUP, int4_fits

    module = name.removesuffix(".weight")
    if bits == 4 and int4_fits(weight.values):
        n, k = weight.values.shape
        scale = weight.scale.float()[None, :, None].expand(k // GROUP, n, 1)
        scales_zeros = torch.cat([scale, torch.zeros_like(scale)], dim=-1).to(torch.bfloat16).contiguous()
        q = weight.values.to(torch.int32) + 8
        return {f"{module}.weight_int4": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                f"{module}.scales_zeros": scales_zeros}
    return {f"{module}.weight_int8": weight.values.contiguous(), f"{module}.scales": weight.scale.to(torch.bfloat16)}

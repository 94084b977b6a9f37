"""Launch profiles: turn settings plus what the machine has into one concrete plan (device, bits, dtype).

The probe of the hardware is a plain function argument so tests can describe a GPU that is not there.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from ..config import Settings

log = logging.getLogger(__name__)

GIB = 1024**3
WINDOWS_DENSE_MIN_RAM_GIB = 24  # the bfloat16 model holds 12.5 GB; leave room for Windows and a browser
INT8_MIN_RAM_GIB = 14  # the 8-bit model holds 7 GB: a "16 GB" PC (15.7 GiB) with a browser open
WINDOWS_INT8_MIN_RAM_GIB = 10  # on Windows 8-bit beats 4-bit on every CPU; with less RAM 4-bit must do


@dataclass(frozen=True)
class Profile:
    bits: int
    min_free_gib: float  # auto picks the largest profile whose need fits the free memory
    max_context: int


PROFILES = {
    "low": Profile(bits=4, min_free_gib=0, max_context=8192),
    "mid": Profile(bits=8, min_free_gib=10, max_context=8192),
    "high": Profile(bits=16, min_free_gib=14, max_context=8192),
}


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    free_bytes: int = 0  # free memory of the CUDA device
    bf16: bool = False  # whether the CUDA device supports bfloat16
    name: str = "cpu"
    ram_bytes: int = 0  # the machine's RAM (0: unknown)
    fast_int8: bool = False  # oneDNN's int8 GEMM beats bfloat16 on this CPU (cpu_quant.onednn_int8_fast)


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda" or "cpu"
    bits: int  # 4, 8 or 16
    dtype: str  # compute dtype name: float16, bfloat16 or float32
    max_context: int
    profile: str
    reason: str
    backend: str = ""  # dense, torch (torch's CPU int4/int8 kernels) or bnb (bitsandbytes); "" = the default

    def __post_init__(self):
        if not self.backend:
            object.__setattr__(self, "backend", default_backend(self.device, self.bits, self.dtype))
        if self.backend == "torch":  # torch's int4/int8 CPU kernels take bfloat16 activations
            object.__setattr__(self, "dtype", "bfloat16")

    @property
    def precision(self) -> str:
        return f"{self.bits}-bit" if self.bits < 16 else self.dtype


def default_backend(device: str, bits: int, dtype: str = "bfloat16") -> str:
    """Which code runs quantized weights, chosen by measurement on the full-size model (README, Performance).

    CUDA: bitsandbytes. CPU: torch's own kernels from a pre-quantized cache, at 8-bit oneDNN's int8 GEMM (3.4
    tok/s = 0.91 of the memory bandwidth, 1.18x llama.cpp's Q8_0; bitsandbytes' LLM.int8 is slower on a CPU), at
    4-bit torch's int4 kernel, which beat bitsandbytes' NF4 on every figure of the last full-size run (decode
    3.9 against 3.3 tok/s, prompts 48 against 14 tok/s, ready in 6 s against 29, 4.6 GB against 7.6). torch's
    kernels compute in bfloat16: another compute dtype asked for (float32 for exactness) keeps bitsandbytes.
    """
    if bits == 16:
        return "dense"
    if device == "cpu" and dtype == "bfloat16":
        return "torch"
    return "bnb"


def probe_hardware() -> Hardware:
    import torch

    if not torch.cuda.is_available():
        from .cpu_quant import onednn_int8_fast

        return Hardware(cuda=False, ram_bytes=total_ram(), fast_int8=onednn_int8_fast())
    free, _total = torch.cuda.mem_get_info()
    return Hardware(cuda=True, free_bytes=free, bf16=torch.cuda.is_bf16_supported(),
                    name=torch.cuda.get_device_name())


def total_ram() -> int:
    try:
        import psutil  # installed with accelerate

        return psutil.virtual_memory().total
    except ImportError:
        return 0


def plan_for(settings: Settings, hardware: Hardware) -> Plan:
    if settings.device == "cuda" and not hardware.cuda:
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    device = "cuda" if settings.device == "cuda" or (settings.device == "auto" and hardware.cuda) else "cpu"

    profile = settings.profile
    if profile == "auto":
        profile, reason = _auto_profile(device, hardware)
    else:
        reason = f"profile {profile} was asked for"
    bits = PROFILES[profile].bits
    if settings.quantize is not None:
        bits = 16 if settings.quantize == 0 else settings.quantize
        reason += f"; --quantize {settings.quantize} overrides it to {bits}-bit"

    dtype = _dtype(settings.dtype, device, hardware)
    max_context = settings.max_context or PROFILES[profile].max_context
    backend = settings.cpu_backend if device == "cpu" and bits < 16 and settings.cpu_backend != "auto" else ""
    return Plan(device=device, bits=bits, dtype=dtype, max_context=max_context, profile=profile, reason=reason,
                backend=backend)


def _auto_profile(device: str, hardware: Hardware) -> tuple[str, str]:
    if device == "cpu":
        return _auto_cpu_profile(hardware)
    free_gib = hardware.free_bytes / GIB
    for name in ("high", "mid", "low"):
        if free_gib >= PROFILES[name].min_free_gib:
            return name, f"{hardware.name} has {free_gib:.1f} GiB free: profile {name} ({PROFILES[name].bits}-bit)"
    raise AssertionError("the low profile needs no free memory")


def _auto_cpu_profile(hardware: Hardware) -> tuple[str, str]:
    """Measured on the full-size model (bench/bench_cpu.py; Windows: torch's Windows build under wine):
    - oneDNN's int8 GEMM (8-bit) decodes at 0.91 of the memory bandwidth, as fast as 4-bit here, reads prompts
      1.7x faster and stays far closer to bfloat16 (KL 0.26 against 17): with RAM for its 7 GB, it is the pick
      where it is fast (AVX512 or VNNI).
    - On Windows torch's int4 kernel and bitsandbytes (no CPU library in its Windows wheel) are 4-7x slower than
      the bfloat16 matmul; oneDNN is not (it generates its code at run time), and even where it is slow (AVX2
      without VNNI) it beats them: 8-bit, or bfloat16 with RAM for 12.5 GB where 8-bit is slow.
    - Otherwise 4-bit (4.6 GB)."""
    ram_gib = hardware.ram_bytes / GIB
    ram = f"{ram_gib:.0f} GiB of RAM"
    if hardware.fast_int8 and ram_gib >= INT8_MIN_RAM_GIB:
        return "mid", f"no CUDA GPU: CPU with 8-bit weights on oneDNN's int8 GEMM ({ram})"
    if sys.platform == "win32":
        if ram_gib >= WINDOWS_DENSE_MIN_RAM_GIB:
            return "high", (f"no CUDA GPU, Windows with {ram} and a CPU without fast int8: bfloat16 weights "
                            "(torch's Windows build has no fast 4-bit kernel)")
        if ram_gib >= WINDOWS_INT8_MIN_RAM_GIB:
            return "mid", f"no CUDA GPU, Windows with {ram}: 8-bit weights (faster than 4-bit in Windows builds)"
    return "low", f"no CUDA GPU: CPU with 4-bit weights ({ram})"


def _dtype(asked: str, device: str, hardware: Hardware) -> str:
    if asked == "bfloat16" and device == "cuda" and not hardware.bf16:
        raise ValueError("this GPU does not support bfloat16; use --dtype float16")
    if asked != "auto":
        return asked
    # float16 on CPU is slow in torch; bfloat16 is fast on current CPUs.
    return "float16" if device == "cuda" else "bfloat16"

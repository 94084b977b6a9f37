"""Launch profiles: turn settings plus what the machine has into one concrete plan (device, bits, dtype).

The probe of the hardware is a plain function argument so tests can describe a GPU that is not there.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Settings
from .checkpoint import source_bits, trained_context

if TYPE_CHECKING:  # measured with torch, which this module does not import at the top
    from .cpu_kernels import KernelChoice

log = logging.getLogger(__name__)

GIB = 1024**3
DENSE_MIN_RAM_GIB = 24  # the bfloat16 model holds 12.5 GB; leave room for the system and a browser
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
    kernels: KernelChoice | None = None  # the CPU kernels' measured speeds (cpu_kernels.measure)


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda" or "cpu"
    bits: int  # 4, 8 or 16
    dtype: str  # compute dtype name: float16, bfloat16 or float32
    max_context: int
    profile: str
    reason: str
    backend: str = ""  # dense, torch (torch's CPU int4/int8 kernels) or bnb (bitsandbytes); "" = the default
    int8_kernel: str = "auto"  # with backend torch at 8-bit: torch, fbgemm, onednn, or auto (cpu_kernels measures)
    int4_kernel: str = "auto"  # with backend torch at 4-bit: torch, vnni, or auto (cpu_kernels measures)

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

    CUDA: bitsandbytes. CPU: torch's own kernels from a pre-quantized cache (int8 on torch's kernel or oneDNN's,
    whichever cpu_kernels.py measures faster; int4 on torch's), faster than bitsandbytes on every full-size run
    (docs/performance.md). torch's kernels compute in bfloat16: another compute dtype asked for (float32 for
    exactness) keeps bitsandbytes.
    """
    if bits == 16:
        return "dense"
    if device == "cpu" and dtype == "bfloat16":
        return "torch"
    return "bnb"


def probe_hardware() -> Hardware:
    import torch

    if not torch.cuda.is_available():
        from .cpu_kernels import measure

        return Hardware(cuda=False, ram_bytes=total_ram(), kernels=measure())
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
        # chatglm2-6b-int4 on the CPU: the int4 cache holds its integers as they are, so more bits would only
        # cost memory (on a GPU bitsandbytes requantizes: its 8-bit stays closer than NF4, docs/configuration.md)
        if source_bits(settings.model_dir) == 4 and device == "cpu" and PROFILES[profile].bits > 4:
            profile, reason = "low", reason + "; the checkpoint holds 4-bit weights: 4-bit"
    else:
        reason = f"profile {profile} was asked for"
    bits = PROFILES[profile].bits
    if settings.quantize is not None:
        bits = 16 if settings.quantize == 0 else settings.quantize
        reason += f"; --quantize {settings.quantize} overrides it to {bits}-bit"

    dtype = _dtype(settings.dtype, device, hardware)
    max_context = settings.max_context or trained_context(settings.model_dir) or PROFILES[profile].max_context
    asked = settings.cpu_kernels if device == "cpu" and bits < 16 else "auto"
    backend = {"auto": "", "onednn": "torch", "fbgemm": "torch", "vnni": "torch"}.get(asked, asked)
    int8_kernel = asked if asked in ("torch", "fbgemm", "onednn") else "auto"
    int4_kernel = asked if asked in ("torch", "vnni") else "auto"
    return Plan(device=device, bits=bits, dtype=dtype, max_context=max_context, profile=profile, reason=reason,
                backend=backend, int8_kernel=int8_kernel, int4_kernel=int4_kernel)


def _auto_profile(device: str, hardware: Hardware) -> tuple[str, str]:
    if device == "cpu":
        return _auto_cpu_profile(hardware)
    free_gib = hardware.free_bytes / GIB
    for name in ("high", "mid", "low"):
        if free_gib >= PROFILES[name].min_free_gib:
            return name, f"{hardware.name} has {free_gib:.1f} GiB free: profile {name} ({PROFILES[name].bits}-bit)"
    raise AssertionError("the low profile needs no free memory")


# 8-bit for its prompts only while it decodes at least 2/3 as fast as 4-bit (against torch's int4 kernel: 1.2-1.3x
# slower on an AMX Xeon and a Zen 4); a CPU whose int8 kernels decode slower than that keeps 4-bit (against the
# VNNI kernel: 1.7x slower on every CPU with VNNI measured, docs/performance.md)
INT8_DECODE_AT_MOST = 1.5


def _auto_cpu_profile(hardware: Hardware) -> tuple[str, str]:
    """The fastest precision at decoding that fits the RAM, by the kernels' measured speed on this CPU
    (cpu_kernels.py); within 10 % of the fastest, more bits win (closer to the model as trained). 4-bit, which
    costs the most quality, only where it is also faster than 8-bit at prompts (or 8-bit decodes > 1.5x slower):
    on torch's int4 kernel it decoded ~20 % faster on an AMX Xeon and a Zen 4 but answered a short prompt 2-5x
    later; on the VNNI kernel (int4_vnni.py) it decodes ~1.7x faster wherever that runs. With 8-bit
    holding 7 GB, a "16 GB" PC (15.7 GiB) qualifies; Windows PCs with less RAM still get 8-bit, which was faster
    than torch's Windows int4 kernel on every CPU measured. Without a measurement: 8-bit where it fits."""
    ram_gib = hardware.ram_bytes / GIB
    ram = f"{ram_gib:.0f} GiB of RAM"
    fits = ["low"]
    if ram_gib >= (WINDOWS_INT8_MIN_RAM_GIB if sys.platform == "win32" else INT8_MIN_RAM_GIB):
        fits.append("mid")
    if ram_gib >= DENSE_MIN_RAM_GIB:
        fits.append("high")
    kernels = hardware.kernels
    speeds = {name: kernels.decode_ms_at(PROFILES[name].bits) for name in fits} if kernels else {}
    speeds = {name: ms for name, ms in speeds.items() if ms is not None}
    if not speeds:
        name = "mid" if "mid" in fits else "low"
        return name, f"no CUDA GPU: CPU with {PROFILES[name].bits}-bit weights ({ram})"
    fastest = min(speeds.values())
    name = max((n for n, ms in speeds.items() if ms <= 1.1 * fastest), key=lambda n: PROFILES[n].bits)
    measured = ", ".join(f"{PROFILES[n].bits}-bit {ms:.1f} ms" for n, ms in speeds.items())
    prompts = {bits: kernels.prompt_ms_at(bits) for bits in (4, 8)}
    if (name == "low" and "mid" in speeds and None not in prompts.values() and prompts[8] < prompts[4]
            and speeds["mid"] <= INT8_DECODE_AT_MOST * speeds["low"]):
        return "mid", (f"no CUDA GPU: CPU with 8-bit weights, which fit {ram}: 4-bit decodes faster here "
                       f"(one token through a 6B layer: {measured}) but runs prompts slower "
                       f"(a prompt through a 6B matrix: 8-bit {prompts[8]:.1f} ms, 4-bit {prompts[4]:.1f} ms)")
    return name, (f"no CUDA GPU: CPU with {PROFILES[name].bits}-bit weights, the fastest that fits {ram} "
                  f"(one token through a 6B layer: {measured})")


def _dtype(asked: str, device: str, hardware: Hardware) -> str:
    if asked == "bfloat16" and device == "cuda" and not hardware.bf16:
        raise ValueError("this GPU does not support bfloat16; use --dtype float16")
    if asked != "auto":
        return asked
    # float16 on CPU is slow in torch; bfloat16 is fast on current CPUs.
    return "float16" if device == "cuda" else "bfloat16"

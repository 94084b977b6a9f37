"""How many threads torch computes with on the CPU: on a hybrid CPU, the performance cores only.

torch starts one thread per physical core. On a hybrid CPU (Intel Core 12th gen and later, Core Ultra; Apple M)
that counts the efficiency cores too, and torch splits every matmul evenly among its threads: the performance
cores finish their share and wait for the slower ones, so a decode step takes as long as an efficiency core's
share (llama.cpp's maintainers advise leaving those cores out for the same reason). The default is therefore
the performance cores, found in what the system reports (Linux: the cpu_core PMU Intel hybrids register beside
cpu_atom; Windows: each core's EfficiencyClass; macOS: the perflevel sysctls). `--threads N` sets any count, and
an OMP_NUM_THREADS / MKL_NUM_THREADS in the environment (which torch reads itself) is left as it is.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYS_DEVICES = Path("/sys/devices")
STANDARD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch sizes its pool from these when set
RELATION_PROCESSOR_CORE = 0  # LOGICAL_PROCESSOR_RELATIONSHIP: one record per physical core


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def as_dict(self) -> dict:
        return {"threads": self.threads, "reason": self.reason}


def choose(asked: int, default: int, performance: int | None, environ: Mapping[str, str]) -> ThreadChoice:
    """`asked` (--threads; 0 = automatic), torch's `default` count, and the performance cores (None: all alike)."""
    if asked < 0:
        raise ValueError(f"--threads {asked}: give a number of threads, or 0 for the automatic choice")
    if asked:
        return ThreadChoice(asked, f"--threads {asked}")
    for name in STANDARD_VARIABLES:
        if environ.get(name, "").strip():
            return ThreadChoice(default, f"{name}={environ[name]} in the environment (torch's own reading)")
    if performance and performance < default:
        return ThreadChoice(performance, f"the {performance} performance cores of this hybrid CPU's {default}: "
                                         "its efficiency cores would hold up every matmul")
    return ThreadChoice(default, "one per physical core (torch's default)")


@functools.cache
def torch_default() -> int:
    """torch's own count, read once: later reads would see what apply() set."""
    import torch

    return torch.get_num_threads()


def apply(asked: int) -> ThreadChoice:
    """Choose and set torch's thread count before anything is measured or loaded."""
    import torch

    choice = choose(asked, torch_default(), performance_cores(), os.environ)
    torch.set_num_threads(choice.threads)
    log.info("CPU threads: %d, %s", choice.threads, choice.reason)
    return choice


def performance_cores() -> int | None:
    """How many physical performance cores a hybrid CPU has; None where all cores are alike or it is not known."""
    try:
        if sys.platform == "win32":
            return windows_performance_cores()
        if sys.platform == "darwin":
            return mac_performance_cores()
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return linux_performance_cores(SYS_DEVICES, allowed)
    except (OSError, ValueError, AttributeError):  # (the system does not say: keep torch's count)
        return None


# -- Linux --------------------------------------------------------------------------------------------------------
def linux_performance_cores(devices: Path, allowed: set[int] | None = None) -> int | None:
    """Intel hybrids register two PMUs, cpu_core and cpu_atom, each listing its logical CPUs; the performance
    cores are cpu_core's, counted as physical cores (hyper-threads share one), among the CPUs this process may use."""
    try:
        performance = cpu_list((devices / "cpu_core" / "cpus").read_text())
        efficient = cpu_list((devices / "cpu_atom" / "cpus").read_text())
    except OSError:
        return None  # not an Intel hybrid
    if allowed is not None:
        performance, efficient = performance & allowed, efficient & allowed
    if not performance or not efficient:
        return None  # the CPUs this process runs on are all of one kind
    topology = devices / "system" / "cpu"
    cores = {((topology / f"cpu{cpu}" / "topology" / "physical_package_id").read_text().strip(),
              (topology / f"cpu{cpu}" / "topology" / "core_id").read_text().strip()) for cpu in performance}
    return len(cores)


def cpu_list(text: str) -> set[int]:
    """The kernel's CPU list format, '0-7,16,18-19' -> {0, ..., 7, 16, 18, 19}."""
    cpus = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


# -- Windows ------------------------------------------------------------------------------------------------------
def windows_performance_cores() -> int | None:
    return fastest_class_count(windows_core_classes())


def windows_core_classes() -> list[int]:
    """GetLogicalProcessorInformationEx(RelationProcessorCore): one record per physical core with its
    EfficiencyClass, higher for faster cores (all 0 where the cores are alike)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    size = wintypes.DWORD(0)
    kernel32.GetLogicalProcessorInformationEx(RELATION_PROCESSOR_CORE, None, ctypes.byref(size))  # sizes it
    buffer = ctypes.create_string_buffer(size.value)
    if not size.value or not kernel32.GetLogicalProcessorInformationEx(RELATION_PROCESSOR_CORE, buffer,
                                                                       ctypes.byref(size)):
        raise OSError(ctypes.get_last_error(), "GetLogicalProcessorInformationEx failed")
    return efficiency_classes(buffer.raw[:size.value])


def efficiency_classes(records: bytes) -> list[int]:
    """Each core's EfficiencyClass from SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX records: Relationship and Size
    (two DWORDs), then PROCESSOR_RELATIONSHIP's Flags and EfficiencyClass bytes."""
    classes, offset = [], 0
    while offset + 10 <= len(records):
        relationship, size = struct.unpack_from("<II", records, offset)
        if size < 10:
            raise ValueError(f"a processor record of {size} bytes")
        if relationship == RELATION_PROCESSOR_CORE:
            classes.append(records[offset + 9])
        offset += size
    return classes


def fastest_class_count(classes: list[int]) -> int | None:
    """How many cores are of the fastest class; None where there is one class."""
    if len(set(classes)) < 2:
        return None
    return classes.count(max(classes))


# -- macOS --------------------------------------------------------------------------------------------------------
def mac_performance_cores(sysctl: Callable[[str], int | None] | None = None) -> int | None:
    """Apple's hw.nperflevels (2 on M chips) and hw.perflevel0.physicalcpu (the performance cores)."""
    sysctl = sysctl or darwin_sysctl
    levels = sysctl("hw.nperflevels")
    return sysctl("hw.perflevel0.physicalcpu") if levels and levels > 1 else None


def darwin_sysctl(name: str) -> int | None:
    """An integer sysctl by name (sysctlbyname in libSystem); None where the system has no such name."""
    import ctypes

    libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    found = libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0
    return value.value if found else None

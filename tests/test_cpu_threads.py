"""How many threads compute on the CPU (model/cpu_threads.py): the performance cores of a hybrid CPU, else torch's
count, --threads as asked. No hybrid CPU exists here: the system's reports are written as a hybrid's would read
(a sysfs tree; Windows' processor records), and the Windows call itself runs in the bundle test under wine."""

from __future__ import annotations

import os
import shutil
import struct

import pytest
import requests
import torch

from server.config import Settings, UserError
from server.model import cpu_threads
from server.startup import load_for


@pytest.fixture
def torch_threads():
    """Whatever a test sets, the next one computes on torch's own count again."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("asked, default, performance, environ, threads, why", [
    (0, 24, 8, {}, 8, "8 performance cores"),  # an i9-13900K: 8 P-cores, 16 E-cores
    (0, 16, 8, {}, 8, "8 performance cores"),  # an i7-13700K: 8 + 8
    (0, 8, None, {}, 8, "torch's default"),  # a Ryzen 7: all cores alike
    (0, 4, 8, {}, 4, "torch's default"),  # a process limited to fewer threads than P-cores: kept
    (6, 24, 8, {}, 6, "--threads 6"),  # asked: as asked
    (0, 24, 8, {"OMP_NUM_THREADS": "24"}, 24, "OMP_NUM_THREADS=24"),  # the person's own setting stays
    (0, 24, 8, {"OMP_NUM_THREADS": " "}, 8, "8 performance cores"),  # (an empty one is none)
])
def test_the_count_is_the_performance_cores_unless_asked_otherwise(asked, default, performance, environ, threads,
                                                                   why):
    choice = cpu_threads.choose(asked, default, performance, environ)
    assert choice.threads == threads and why in choice.reason


def test_a_negative_count_is_refused_by_name():
    with pytest.raises(ValueError, match="--threads -2"):
        cpu_threads.choose(-2, 8, None, {})


def write_cpu(devices, cpu: int, package: int, core: int) -> None:
    topology = devices / "system" / "cpu" / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text(f"{package}\n")
    (topology / "core_id").write_text(f"{core}\n")


@pytest.fixture
def raptor_lake(tmp_path):
    """/sys/devices of an i7-13700K as Linux shows it: P-cores 0-15 (8 cores, two threads each: 2c and 2c + 1),
    E-cores 16-23, and the two PMUs an Intel hybrid registers."""
    devices = tmp_path / "devices"
    for cpu in range(16):
        write_cpu(devices, cpu, 0, 4 * (cpu // 2))
    for cpu in range(16, 24):
        write_cpu(devices, cpu, 0, 32 + cpu)
    for pmu, cpus in (("cpu_core", "0-15\n"), ("cpu_atom", "16-23\n")):
        (devices / pmu).mkdir()
        (devices / pmu / "cpus").write_text(cpus)
    return devices


def test_linux_counts_a_hybrids_performance_cores_not_their_threads(raptor_lake):
    assert cpu_threads.linux_performance_cores(raptor_lake) == 8
    assert cpu_threads.linux_performance_cores(raptor_lake, allowed=set(range(24))) == 8
    assert cpu_threads.linux_performance_cores(raptor_lake, allowed={0, 1, 2, 16, 17}) == 2  # (taskset, cgroups)


def test_linux_where_the_cores_this_process_may_use_are_alike(raptor_lake, tmp_path):
    assert cpu_threads.linux_performance_cores(raptor_lake, allowed=set(range(16, 24))) is None  # E-cores only
    assert cpu_threads.linux_performance_cores(raptor_lake, allowed=set(range(8))) is None  # P-cores only
    shutil.rmtree(raptor_lake / "cpu_atom")
    assert cpu_threads.linux_performance_cores(raptor_lake) is None  # no second kind
    assert cpu_threads.linux_performance_cores(tmp_path / "absent") is None


@pytest.mark.parametrize("text, cpus", [("0-3\n", {0, 1, 2, 3}), ("0,2,4-5", {0, 2, 4, 5}), ("7", {7}), ("", set())])
def test_the_kernels_cpu_list_format(text, cpus):
    assert cpu_threads.cpu_list(text) == cpus


def core_record(efficiency_class: int, smt: bool) -> bytes:
    """One SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX of RelationProcessorCore as Windows lays it out (48 bytes):
    Relationship, Size, then PROCESSOR_RELATIONSHIP: Flags, EfficiencyClass, Reserved[20], GroupCount and one
    GROUP_AFFINITY (an 8-byte mask, its group and 3 reserved WORDs)."""
    body = struct.pack("<BB20xH", 1 if smt else 0, efficiency_class, 1) + struct.pack("<QH6x", 0b11, 0)
    return struct.pack("<II", 0, 8 + len(body)) + body


def test_windows_records_count_the_cores_of_the_highest_efficiency_class():
    hybrid = b"".join(core_record(1, smt=True) for _ in range(6)) + b"".join(core_record(0, False) for _ in range(8))
    assert len(core_record(1, True)) == 48
    assert cpu_threads.efficiency_classes(hybrid) == [1] * 6 + [0] * 8
    assert cpu_threads.fastest_class_count(cpu_threads.efficiency_classes(hybrid)) == 6
    alike = b"".join(core_record(0, smt=True) for _ in range(8))
    assert cpu_threads.fastest_class_count(cpu_threads.efficiency_classes(alike)) is None
    with pytest.raises(ValueError, match="record of 4 bytes"):
        cpu_threads.efficiency_classes(struct.pack("<II", 0, 4) + bytes(8))


@pytest.mark.parametrize("reported, cores", [
    ({"hw.nperflevels": 2, "hw.perflevel0.physicalcpu": 4, "hw.perflevel1.physicalcpu": 4}, 4),  # an M2
    ({"hw.nperflevels": 1, "hw.perflevel0.physicalcpu": 8}, None),  # one kind of core
    ({}, None),  # an Intel Mac: no perflevels at all
])
def test_macos_reads_the_performance_level_sysctls(reported, cores):
    """(macOS cannot run here: the sysctls are given as an Apple M2 and an Intel Mac report them.)"""
    assert cpu_threads.mac_performance_cores(reported.get) == cores


def test_a_start_computes_on_the_threads_asked_and_health_says_why(tiny_checkpoint, torch_threads, tmp_path,
                                                                  engine_for, serve):
    folder = tmp_path / "chatglm2-6b"
    shutil.copytree(tiny_checkpoint, folder)
    loaded = load_for(Settings(model_dir=folder, offline=True, quantize=8, max_context=128, threads=1))
    assert torch.get_num_threads() == 1
    health = requests.get(serve(engine_for(loaded)).url + "/health", timeout=10).json()
    assert health["cpu_threads"] == {"threads": 1, "reason": "--threads 1"}
    assert health["cpu_kernels"]["measured"]  # (the kernels were timed on that one thread)

    automatic = load_for(Settings(model_dir=folder, offline=True, quantize=8, max_context=128))
    expected = cpu_threads.choose(0, cpu_threads.torch_default(), cpu_threads.performance_cores(), os.environ)
    assert automatic.cpu_threads == expected.as_dict() and torch.get_num_threads() == expected.threads


def test_a_negative_thread_count_stops_the_start_with_the_fix(tiny_checkpoint, torch_threads):
    with pytest.raises(UserError, match="--threads -1: give a number of threads, or 0"):
        load_for(Settings(model_dir=tiny_checkpoint, offline=True, quantize=16, dtype="float32", threads=-1))
    assert torch.get_num_threads() == torch_threads

"""A GPU owner running the CPU build of torch is told so, with the one step that fixes it.

The GPU cannot exist here: a stand-in `nvidia-smi` on PATH answers as the NVIDIA driver's does.
"""

import stat
import sys

import pytest
import requests

from server.config import Settings
from server.engine import Engine
from server.setup import gpu
from server.startup import load_for

SMI_OUTPUT = "GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-5a1c3e9e-0000-0000-0000-000000000000)"


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """fake_smi(exit_code=0): an nvidia-smi on PATH that lists one GPU (or fails like a broken driver)."""
    def install(exit_code: int = 0):
        script = tmp_path / "bin" / "nvidia-smi"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\necho '{SMI_OUTPUT}'\nexit {exit_code}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    return install


def test_no_driver_no_notice(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu.nvidia_gpus() == [] and gpu.unused_gpu_notice(torch_has_cuda=False) is None


def test_a_broken_driver_counts_as_no_gpu(fake_smi):
    fake_smi(exit_code=9)
    assert gpu.nvidia_gpus() == []


def test_gpu_with_cpu_torch_gets_the_fix(fake_smi, monkeypatch):
    fake_smi()
    assert gpu.nvidia_gpus() == ["GPU 0: NVIDIA GeForce RTX 3060"]
    assert gpu.unused_gpu_notice(torch_has_cuda=True) is None
    notice = gpu.unused_gpu_notice(torch_has_cuda=False)
    assert "NVIDIA GeForce RTX 3060" in notice and "CPU" in notice and "pip install torch --index-url" in notice
    monkeypatch.setattr(sys, "platform", "win32")  # (which() then looks for nvidia-smi.exe: pass the list)
    notice = gpu.unused_gpu_notice(torch_has_cuda=False, gpus=["GPU 0: NVIDIA GeForce RTX 3060"])
    assert "setup_offline.bat" in notice and "CUDA" in notice and "检测到 NVIDIA 显卡" in notice


def test_health_carries_the_notice_while_the_model_runs_on_the_cpu(fake_smi, tiny_checkpoint, serve):
    fake_smi()
    engine = Engine()
    server = serve(engine)
    settings = Settings(model_dir=tiny_checkpoint, offline=True, dtype="float32", quantize=16, max_context=128)
    engine.load_in_background(lambda e: load_for(settings, report=e.set_state, notice=e.add_notice)).join(120)
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ready" and health["device"] == "cpu"
    assert len(health["notices"]) == 1 and "RTX 3060" in health["notices"][0]


def test_no_notice_when_the_cpu_was_asked_for(fake_smi, tiny_checkpoint):
    fake_smi()
    notices = []
    load_for(Settings(model_dir=tiny_checkpoint, offline=True, device="cpu", dtype="float32", quantize=16),
             notice=notices.append)
    assert notices == []

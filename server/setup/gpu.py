"""Is there an NVIDIA GPU that torch cannot use? Light on purpose (no torch): setup_offline.bat asks it too.

The Windows bundle ships the CPU build of torch (PyPI has no CUDA build for Windows), so a GPU owner who never
ran setup_offline.bat would silently run on the CPU. `nvidia-smi` comes with every NVIDIA driver and answers
without CUDA, so it tells us a card is there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
# (Chinese, English): the one step that fixes it
FIX_WINDOWS = ("联网后双击 setup_offline.bat，它会安装 CUDA 版 torch",
               "double-click setup_offline.bat while online: it installs the CUDA build of torch")
FIX_OTHER = (f"运行 pip install torch --index-url {CUDA_INDEX}", f"run pip install torch --index-url {CUDA_INDEX}")


def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs the driver reports ("GPU 0: NVIDIA GeForce RTX 3060 (UUID: …)"), or [] without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [line.split(" (UUID")[0].strip() for line in done.stdout.splitlines() if line.startswith("GPU ")]


def unused_gpu_notice(torch_has_cuda: bool, gpus: list[str] | None = None) -> str | None:
    """The one-line notice for a GPU that torch cannot use, with the step that fixes it; None when all is well."""
    if torch_has_cuda:
        return None
    gpus = nvidia_gpus() if gpus is None else gpus
    if not gpus:
        return None
    fix_zh, fix_en = FIX_WINDOWS if sys.platform == "win32" else FIX_OTHER
    name = gpus[0].split(": ", 1)[-1]
    return (f"检测到 NVIDIA 显卡 {name}，但当前 torch 是 CPU 版，模型在 CPU 上运行（很慢）。解决：{fix_zh}。 / "
            f"An NVIDIA GPU ({name}) is present, but this torch has no CUDA, so the model runs on the CPU (slow). "
            f"Fix: {fix_en}.")

"""`python -m server.install_deps` (what setup_offline.bat runs): install or repair the packages of the bundle's
embedded Python from requirements.txt.

- Offline first: when the bundle has a `wheels` folder, pip installs from it alone (`--no-index`).
- Otherwise online, from PyPI or the index given with --index-url (a mirror for users in China).
- torch: PyPI has only CPU builds for Windows, so with an NVIDIA GPU (nvidia-smi answers) torch comes from the
  CUDA wheel index (--torch-index); without one, the CPU build.
- pip itself is bootstrapped from the bundled pip wheel when `python -m pip` is missing (the embeddable Python
  ships without it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from .config import PROJECT_ROOT

CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def plan(root: Path, python: str, gpu: bool, pip_present: bool, index_url: str | None,
         torch_index: str | None) -> list[list[str]]:
    """The commands that install the requirements, in order."""
    wheels = root / "wheels"
    # offline when the bundle carries the packages themselves, not only the pip wheel every bundle has
    offline = wheels.is_dir() and any(not w.name.startswith("pip-") for w in wheels.glob("*.whl"))
    commands = []
    if not pip_present:
        bundled = sorted(wheels.glob("pip-*.whl")) if wheels.is_dir() else []
        if not bundled:
            raise SystemExit("python -m pip is missing and no wheels/pip-*.whl is bundled: unzip the bundle again.\n"
                             "pip 缺失，且包内没有 wheels/pip-*.whl：请重新解压完整的懒人包。")
        # a wheel is a zip that Python can run: pip installs itself from its own wheel
        commands.append([python, str(bundled[-1] / "pip"), "install", "--no-index", str(bundled[-1])])
    pip = [python, "-m", "pip", "install", "--upgrade", "--no-warn-script-location"]
    if offline:
        source = ["--no-index", "--find-links", str(wheels)]
    else:
        source = ["--index-url", index_url] if index_url else []
    if not offline:  # torch first, from the right wheel index, so requirements.txt's "torch>=2.4" is satisfied
        commands.append(pip + ["torch", "--index-url", torch_index or (CUDA_INDEX if gpu else CPU_INDEX)])
    commands.append(pip + source + ["-r", str(root / "requirements.txt")])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="setup_offline.bat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-url", help="package index instead of PyPI, e.g. https://pypi.tuna.tsinghua.edu.cn/simple")
    parser.add_argument("--torch-index", help=f"wheel index for torch (default: {CUDA_INDEX} with an NVIDIA GPU, "
                                              f"else {CPU_INDEX})")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    gpu = has_nvidia_gpu()
    print("检测到 NVIDIA 显卡 / NVIDIA GPU found: CUDA build of torch" if gpu
          else "未检测到 NVIDIA 显卡 / No NVIDIA GPU: CPU build of torch")
    for command in plan(PROJECT_ROOT, sys.executable, gpu, has_pip(sys.executable), args.index_url, args.torch_index):
        print(">", " ".join(command), flush=True)
        if not args.dry_run and subprocess.run(command).returncode != 0:
            print("安装失败，请检查网络或换一个 --index-url / Installing failed: check the network or try another "
                  "--index-url.", file=sys.stderr)
            return 1
    print("完成 / Done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m server.setup.install_deps` (what setup_offline.bat runs): install or repair the packages of the bundle's
embedded Python, exactly as the bundle's hashed lock says.

- pip itself is bootstrapped from the bundled pip wheel when `python -m pip` is missing (the embeddable Python
  ships without it). pip refuses to modify itself unless started as `python -m pip`, so the wheel is put on
  sys.path by a tiny `-c` program instead of being run as `pip.whl/pip`.
- Packages come from the lock in `system/lock/` (written by tools/build_pack.py): `--require-hashes --no-deps`,
  so what is installed is what was tested, whether from the bundled `wheels/` folder (offline, a `--wheels`
  bundle) or from the index (online; `--index-url` for a mirror in China).
- torch: PyPI has only CPU builds for Windows. With an NVIDIA GPU (nvidia-smi answers) and the CUDA wheel index
  reachable, the same torch version comes from that index in its CUDA build (`--cuda`/`--cpu` force a choice);
  that index publishes a sha256 for every wheel, which pip checks. Everything else still follows the lock.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..config import PROJECT_ROOT
from .gpu import CUDA_INDEX, nvidia_gpus

LOCK_DIR = Path("system") / "lock"  # torch.txt (the torch pin of the lock) and others.txt (the rest)
# pip refuses to modify itself when sys.argv[0] is named pip (its Windows guard): run it from the wheel as a module
BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'pip-bootstrap'; "
             "runpy.run_module('pip', run_name='__main__')")


class Step(list):
    """One command, with what to tell the person when it fails."""

    def __init__(self, command: list[str], failure: str):
        super().__init__(command)
        self.failure = failure


def locked_torch_version(root: Path) -> str:
    text = (root / LOCK_DIR / "torch.txt").read_text(encoding="utf-8")
    return re.search(r"^torch==([^\s\\;]+)", text, re.M).group(1)


def plan(root: Path, python: str, pip_present: bool, cuda: bool, index_url: str | None) -> list[Step]:
    """The commands that install the lock, in order."""
    wheels, lock = root / "wheels", root / LOCK_DIR
    if not (lock / "others.txt").is_file() or not (lock / "torch.txt").is_file():
        raise SystemExit(f"{lock} is missing: unzip the whole bundle again.\n"
                         f"缺少 {lock}：请重新解压完整的懒人包。")
    # offline when the bundle carries the packages themselves, not only the pip wheel every bundle has
    offline = wheels.is_dir() and any(not w.name.startswith("pip-") for w in wheels.glob("*.whl"))
    steps = []
    if not pip_present:
        bundled = sorted(wheels.glob("pip-*.whl")) if wheels.is_dir() else []
        if not bundled:
            raise SystemExit("python -m pip is missing and no wheels/pip-*.whl is bundled: unzip the bundle again.\n"
                             "pip 缺失，且包内没有 wheels/pip-*.whl：请重新解压完整的懒人包。")
        steps.append(Step([python, "-c", BOOTSTRAP, str(bundled[-1]), "install", "--no-index", "--no-deps",
                           "--no-warn-script-location", str(bundled[-1])],
                          "安装 pip 失败 / Installing pip from the bundled wheel failed: unzip the bundle again."))
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-warn-script-location", "--disable-pip-version-check"]
    if offline:
        source = ["--no-index", "--find-links", str(wheels)]
        failure = ("离线安装失败 / Installing from the bundled wheels folder failed: a wheel is missing or damaged; "
                   "unzip the bundle again.")
    else:
        source = ["--index-url", index_url] if index_url else []
        failure = ("下载安装失败 / Downloading the packages failed: check the network, or use a mirror, e.g. "
                   "setup_offline.bat --index-url https://pypi.tuna.tsinghua.edu.cn/simple")
    if cuda:  # the lock's torch version in its CUDA build, from the CUDA index; the rest from the lock
        cu = CUDA_INDEX.rsplit("/", 1)[1]
        steps.append(Step(pip + [f"torch=={locked_torch_version(root)}+{cu}", "--index-url", CUDA_INDEX],
                          f"下载 CUDA 版 torch 失败 / Downloading the CUDA build of torch from {CUDA_INDEX} failed: "
                          "check the network and run setup_offline.bat again, or add --cpu to keep the CPU build."))
        steps.append(Step(pip + source + ["--require-hashes", "-r", str(lock / "others.txt")], failure))
    else:
        steps.append(Step(pip + source + ["--require-hashes", "-r", str(lock / "others.txt"),
                                          "-r", str(lock / "torch.txt")], failure))
    return steps


def has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def index_answers(url: str, timeout: float = 10) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/torch/", method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse a HEAD
    except (OSError, ValueError):
        return False


def choose_cuda(asked: str | None, gpus: list[str], reachable) -> tuple[bool, str]:
    """Whether to install the CUDA build of torch, and the line that says why."""
    if asked == "cpu":
        return False, "--cpu：安装 CPU 版 torch / installing the CPU build of torch"
    if asked == "cuda":
        return True, "--cuda：安装 CUDA 版 torch / installing the CUDA build of torch"
    if not gpus:
        return False, "未检测到 NVIDIA 显卡：CPU 版 torch / No NVIDIA GPU found: the CPU build of torch"
    if reachable():
        return True, f"检测到 {gpus[0]}：安装 CUDA 版 torch / {gpus[0]} found: installing the CUDA build of torch"
    return False, (f"检测到 {gpus[0]}，但连不上 {CUDA_INDEX}：暂用 CPU 版 torch，联网后再运行本程序 / "
                   f"{gpus[0]} found, but {CUDA_INDEX} cannot be reached: keeping the CPU build of torch; run "
                   "setup_offline.bat again when online.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="setup_offline.bat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-url", help="package index instead of PyPI, e.g. https://pypi.tuna.tsinghua.edu.cn/simple")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cuda", dest="torch", action="store_const", const="cuda",
                       help=f"install the CUDA build of torch from {CUDA_INDEX} (default when an NVIDIA GPU is "
                            "found and that index answers)")
    which.add_argument("--cpu", dest="torch", action="store_const", const="cpu", help="keep the CPU build of torch")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    cuda, why = choose_cuda(args.torch, nvidia_gpus(), lambda: index_answers(CUDA_INDEX))
    print(why, flush=True)
    for step in plan(PROJECT_ROOT, sys.executable, has_pip(sys.executable), cuda, args.index_url):
        print(">", " ".join(step), flush=True)
        if not args.dry_run and subprocess.run(step).returncode != 0:
            print(step.failure, file=sys.stderr)
            return 1
    print("完成 / Done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

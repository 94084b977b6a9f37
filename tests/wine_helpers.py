"""Running the Windows bundle under Debian's wine: a prefix with the test-only stub DLL, launchers, waiting."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests

WINE = shutil.which("wine")
MINGW = shutil.which("x86_64-w64-mingw32-gcc")
STUB_SOURCE = Path(__file__).parent / "wine" / "bcryptprimitives.c"
# Where the bundle is unzipped: spaces, Chinese characters and parentheses, like C:\Users\张三\Desktop\懒人包 (测试)
CHINESE_FOLDER = "My Pack (测试) 中文"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wine_prefix(folder: Path, stub: bool = False) -> dict:
    """The environment of a fresh wine prefix in `folder`; with `stub`, bcryptprimitives.dll supplies ProcessPrng
    (missing in wine 8.0; Rust-built wheels need it)."""
    if not WINE:
        pytest.skip("wine is not installed (./test.sh installs Debian's wine when run as root)")
    env = {**os.environ, "WINEPREFIX": str(folder), "WINEDEBUG": "-all", "CHATGLM2_NO_PAUSE": "1",
           "CHATGLM2_OPEN_BROWSER": "0",
           # On a CPU with AMX, oneDNN's Windows build JIT-compiles AMX kernels for bfloat16 matmuls. Windows grants
           # every process the AMX state; Linux only to one that asks (arch_prctl), which wine does not, so those
           # instructions fault under wine ("illegal instruction"). Capping oneDNN's ISA below AMX avoids them.
           "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    if stub:
        if not MINGW:
            pytest.skip("x86_64-w64-mingw32-gcc is missing (Debian's gcc-mingw-w64-x86-64; ./test.sh installs it)")
        subprocess.run(["wineboot", "-i"], env=env, check=True, timeout=300, capture_output=True)
        system32 = folder / "drive_c" / "windows" / "system32"
        subprocess.run([MINGW, "-shared", "-O2", "-o", str(system32 / "bcryptprimitives.dll"), str(STUB_SOURCE),
                        "-ladvapi32"], check=True, timeout=120)
        env["WINEDLLOVERRIDES"] = "bcryptprimitives=n,b"
    return env


def unzip(archive: Path, folder: Path) -> Path:
    """Unzip the bundle into `folder`/CHINESE_FOLDER; return the bundle's root."""
    target = folder / CHINESE_FOLDER
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(target)
        top = bundle.namelist()[0].split("/")[0]
    return target / top


def run_bat(root: Path, env: dict, bat: str, *args: str) -> subprocess.Popen:
    """Run a .bat of the bundle under wine with pipes for all standard handles (python.exe needs pipes)."""
    # ".\" because wine's cmd reads a bare "start_low_vram.bat" as its own START command
    return subprocess.Popen(["wine", "cmd.exe", "/c", f".\\{bat}", *args], cwd=root, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_health(url: str, proc: subprocess.Popen, until, timeout: float) -> dict:
    """Poll /health (bounded) until `until(body)` holds; fail with the console output when the launcher exits."""
    deadline = time.time() + timeout
    body = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}): {proc.stdout.read().decode(errors='replace')}")
        try:
            body = requests.get(url + "/health", timeout=5).json()
            if until(body):
                return body
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise AssertionError(f"/health did not get there in {timeout} s: {body}")


def stop(proc: subprocess.Popen, env: dict) -> str:
    """End a launcher and every wine process of the prefix; return its console output."""
    proc.kill()
    subprocess.run(["wineserver", "-k"], env=env, timeout=60)
    out, _ = proc.communicate(timeout=60)
    return out.decode("utf-8", errors="replace")

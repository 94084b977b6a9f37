"""The Windows lazy pack: launchers (static checks), the bundle builder, and the launchers run under wine."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from server.setup import install_deps
from tests.wine_helpers import free_port, run_bat, stop, unzip, wait_for_health, wine_prefix
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
    assert 'set "PY=system\\python\\python.exe"' in lines and 'if not exist "%PY%" set "PY=system\\python.exe"' in lines
    assert '"%PY%" -s system\\fix_pth.py' in lines  # before the server: the ._pth names the bundle
    assert '"%PY%" -s -m server' in text or '"%PY%" -s -m server.setup.install_deps' in text
    assert "%*" in text


@pytest.mark.parametrize("name, flags", LAUNCHERS.items())
def test_launchers_pass_their_profile_and_leave_settings_to_settings_ini(name, flags):
    text = (ROOT / name).read_text()
    assert f"-m server {flags} %*" in text
    assert "CHATGLM2_OPEN_BROWSER" not in text  # a variable would override settings.ini's open_browser


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
    assert archive.name == f"my-chatglm2-{build_pack.version()}-win64-cpu.zip"
    with zipfile.ZipFile(archive) as bundle:
        top = "my-chatglm2/system/python/"
        pth = bundle.read(top + "python312._pth").decode()
        assert pth.split("\r\n")[:-1] == build_pack.pth_lines("3.12")
        assert top + "python312.zip" in bundle.namelist()
        assert top + "Lib/site-packages/waitress/__init__.py" in bundle.namelist()


def test_pth_keeps_the_interpreter_isolated():
    assert build_pack.pth_lines("3.10") == ["python310.zip", ".", "..\\..", "Lib\\site-packages", "import site"]


def test_fix_pth_writes_the_builders_lines_into_a_hand_placed_python(tmp_path):
    """A Python unzipped by hand into system\\python (python.org's ._pth) or kept in system\\ by an earlier
    bundle gets the bundle's lines; one already right is left alone."""
    sys.path.insert(0, str(ROOT / "system"))
    try:
        import fix_pth
    finally:
        sys.path.pop(0)
    python_org = "python310.zip\r\n.\r\n\r\n# Uncomment to run site.main() automatically\r\n#import site\r\n"
    nested, flat = tmp_path / "bundle" / "system" / "python", tmp_path / "old" / "system"
    for folder in (nested, flat):
        folder.mkdir(parents=True)
        (folder / "python310._pth").write_text(python_org, newline="")
    assert fix_pth.fix(nested, tmp_path / "bundle") == ["python310._pth"]
    assert (nested / "python310._pth").read_bytes().decode().split("\r\n")[:-1] == build_pack.pth_lines("3.10")
    assert fix_pth.fix(nested, tmp_path / "bundle") == []  # right already: not written again
    fix_pth.fix(flat, tmp_path / "old")
    assert (flat / "python310._pth").read_text().splitlines()[2] == ".."


def test_lock_is_for_windows_python_310_with_hashes():
    text = build_pack.lock_file("3.10").read_text()
    assert re.search(r"^transformers==5\.20\.\d+ ", text, re.M)  # the last release for Python 3.10
    assert re.search(r"^msvc-runtime==", text, re.M) and re.search(r"^colorama==", text, re.M)  # Windows-only
    assert re.search(r"^numpy==1\.26\.\d+ ", text, re.M)  # numpy 2's OpenBLAS needs a function wine 8.0 lacks
    entries = build_pack.lock_entries({"flask", "waitress"})
    assert entries.count("==") == 2 and entries.count("--hash=sha256:") >= 2


def test_cuda_and_cpu_bundles_get_distinct_names():
    assert build_pack.flavour(None) == "cpu"
    assert build_pack.flavour("https://download.pytorch.org/whl/cu128/") == "cu128"


def test_a_large_archive_is_split_into_parts_that_join_back(tmp_path):
    archive = tmp_path / "bundle.zip"
    data = bytes(range(256)) * 41  # 10,496 bytes
    archive.write_bytes(data)
    parts = build_pack.split_archive(archive, part_bytes=4000)
    assert [p.name for p in parts] == ["bundle.zip.001", "bundle.zip.002", "bundle.zip.003"]
    assert not archive.exists() and all(p.stat().st_size <= 4000 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == data
    small = tmp_path / "small.zip"
    small.write_bytes(b"x" * 10)
    assert build_pack.split_archive(small, part_bytes=4000) == [small]


# -- setup_offline.bat's plan ------------------------------------------------------------------------------------
def lock_folder(root: Path) -> Path:
    lock = root / install_deps.LOCK_DIR
    lock.mkdir(parents=True)
    (lock / "torch.txt").write_text("torch==2.14.1 \\\n    --hash=sha256:00\n")
    (lock / "others.txt").write_text("flask==3.1.3 \\\n    --hash=sha256:11\n")
    return lock


@pytest.mark.parametrize("cuda, pip_present, wheels, expected", [
    (False, True, [], ["--require-hashes -r {others} -r {torch}"]),
    (True, True, ["pip"], ["torch==2.14.1+cu128 --index-url " + install_deps.CUDA_INDEX,
                           "--require-hashes -r {others}"]),
    (False, True, ["pip", "flask"], ["--no-index --find-links {wheels} --require-hashes -r {others} -r {torch}"]),
    (True, True, ["pip", "flask"], ["torch==2.14.1+cu128 --index-url", "--no-index --find-links {wheels}"]),
    (False, False, ["pip", "flask"], ["-c", "--no-index --find-links"]),
    (False, False, ["pip"], ["-c", "--require-hashes -r {others} -r {torch}"]),  # bootstrap, then online
])
def test_setup_offline_follows_the_lock(tmp_path, cuda, pip_present, wheels, expected):
    lock = lock_folder(tmp_path)
    (tmp_path / "wheels").mkdir()
    for name in wheels:
        (tmp_path / "wheels" / f"{name}-1.0-py3-none-any.whl").write_bytes(b"")
    commands = [" ".join(c) for c in install_deps.plan(tmp_path, "python.exe", pip_present, cuda, None)]
    paths = {"others": lock / "others.txt", "torch": lock / "torch.txt", "wheels": tmp_path / "wheels"}
    assert len(commands) == len(expected)
    for command, part in zip(commands, expected):
        assert part.format(**paths) in command
        assert "--upgrade" not in command  # pinned versions, nothing newer than what was tested
    assert all("--no-deps" in c for c in commands)


def test_pip_is_bootstrapped_as_a_module_not_as_pip(tmp_path):
    """pip refuses to modify itself on Windows when sys.argv[0] is named pip (as in `pip.whl/pip install`)."""
    lock_folder(tmp_path)
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "pip-26.3-py3-none-any.whl"
    wheel.write_bytes(b"")
    first = install_deps.plan(tmp_path, "python.exe", False, False, None)[0]
    assert first[:4] == ["python.exe", "-c", install_deps.BOOTSTRAP, str(wheel)]
    assert first[4:] == ["install", "--no-index", "--no-deps", "--no-warn-script-location", str(wheel)]
    assert "Installing pip" in first.failure


def test_setup_offline_without_pip_or_lock_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="unzip the whole bundle again"):
        install_deps.plan(tmp_path, "python.exe", True, False, None)
    lock_folder(tmp_path)
    with pytest.raises(SystemExit, match="unzip the bundle again"):
        install_deps.plan(tmp_path, "python.exe", False, False, None)


def test_mirror_index_is_used_online(tmp_path):
    lock_folder(tmp_path)
    steps = install_deps.plan(tmp_path, "python.exe", True, False, "https://pypi.tuna.tsinghua.edu.cn/simple")
    assert "--index-url https://pypi.tuna.tsinghua.edu.cn/simple" in " ".join(steps[-1])
    assert "network" in steps[-1].failure


@pytest.mark.parametrize("asked, gpus, answers, cuda", [
    (None, [], True, False),
    (None, ["GPU 0: NVIDIA GeForce RTX 3060"], True, True),  # the default with a GPU and a reachable index
    (None, ["GPU 0: NVIDIA GeForce RTX 3060"], False, False),  # offline: keep the CPU build, say why
    ("cuda", [], False, True),
    ("cpu", ["GPU 0: NVIDIA GeForce RTX 3060"], True, False),
])
def test_cuda_torch_is_chosen_for_a_gpu_when_the_index_answers(asked, gpus, answers, cuda):
    chosen, why = install_deps.choose_cuda(asked, gpus, lambda: answers)
    assert chosen is cuda
    if gpus and not answers and asked is None:
        assert "cannot be reached" in why and "again when online" in why


# -- the reduced bundle: reproducible, pruned, short paths ---------------------------------------------------------
def build_from_another_checkout(tmp_path: Path, out: Path) -> Path:
    """Build from a copy of the project in another folder, with another interpreter path (a second venv)."""
    checkout = tmp_path / "another checkout"
    for name in build_pack.TOP_FILES + ("packaging", "server", "tools", "THUDM/README.md", "system/README.md",
                                        "system/fix_pth.py"):
        source, target = ROOT / name, checkout / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    venv = tmp_path / "venv2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "pip").is_dir())
    subprocess.run([str(venv / "bin" / "python"), "-m", "tools.build_pack", "--only", SMALL, "--wheels",
                    "--out", str(out)], cwd=checkout, env={**os.environ, "PYTHONPATH": str(site)}, check=True,
                   capture_output=True)
    return out / f"my-chatglm2-{build_pack.version()}-win64-cpu.zip"


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """A reduced bundle (no model stack) with its wheels folder, built twice from different checkouts."""
    try:
        first = build_pack.build(tmp_path_factory.mktemp("dist1"), only=set(SMALL.split(",")), wheels=True)
        second = build_from_another_checkout(tmp_path_factory.mktemp("elsewhere"), tmp_path_factory.mktemp("dist2"))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"PyPI is not reachable for the bundle's downloads: {exc}")
    return first, second


def test_bundle_is_byte_identical_from_another_checkout_and_interpreter(small_bundle):
    first, second = small_bundle
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(second.read_bytes()).hexdigest()
    assert (first.parent / "SHA256SUMS").read_text() == f"{digest}  {first.name}\n"


def test_bundle_layout(small_bundle):
    first, _ = small_bundle
    with zipfile.ZipFile(first) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        top = "my-chatglm2/"
        assert any(re.fullmatch(top + r"wheels/pip-[\d.]+-py3-none-any\.whl", n) for n in names)
        assert any(re.fullmatch(top + r"wheels/waitress-[\d.]+-py3-none-any\.whl", n) for n in names)
        for name in BATS + ["settings.ini", "使用说明.txt", "requirements.txt", "README.md", "THUDM/README.md",
                            "system/README.md", "system/fix_pth.py", "system/lock/others.txt",
                            "system/lock/torch.txt", "server/__main__.py", "server/web/webui/app.js",
                            "system/python/python.exe", "system/python/python310.zip",
                            "system/python/Lib/site-packages/flask/__init__.py"]:
            assert top + name in names, name
        assert names == sorted(names) and all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        launcher = next(i for i in infos if i.filename.endswith("开启API服务.bat"))
        assert launcher.flag_bits & 0x800  # UTF-8 name
        pth = archive.read(top + "system/python/python310._pth").decode()
        assert pth.split("\r\n")[:-1] == build_pack.pth_lines("3.10")
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        site = top + "system/python/Lib/site-packages/"
        build_only = [n for n in names if n.startswith((site + "bin/", site + "share/", site + "Scripts/"))
                      or (n.startswith(site) and n.endswith(".whl"))]
        assert build_only == []
        assert max(len(n) for n in names) <= build_pack.MAX_ENTRY
        others = archive.read(top + "system/lock/others.txt").decode()
        assert "waitress==" in others and "--hash=sha256:" in others and "torch==" not in others


# -- the reduced bundle under wine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unpacked(small_bundle, tmp_path_factory):
    env = wine_prefix(tmp_path_factory.mktemp("wineprefix"))
    root = unzip(small_bundle[0], tmp_path_factory.mktemp("wine"))
    yield root, env
    subprocess.run(["wineserver", "-k"], env=env, timeout=30)


def test_launcher_starts_the_server_under_wine(unpacked):
    root, env = unpacked
    port = free_port()
    proc = run_bat(root, env, "start_low_vram.bat", "--port", str(port), "--offline", "--no-chatlog")
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}", proc, lambda h: h["status"] != "loading", 180)
        r = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert r.json() == {"message": "Server started", "success": True}
        assert health["status"] == "error"  # no model stack in this bundle, and no model
        assert "tokenizer.model" in health["error"] and "测试" in health["model"]
    finally:
        stop(proc, env)


def test_a_second_launcher_on_the_same_port_says_it_is_in_use(unpacked):
    root, env = unpacked
    port = free_port()
    first = run_bat(root, env, "start_low_vram.bat", "--port", str(port), "--offline", "--no-chatlog")
    try:
        wait_for_health(f"http://127.0.0.1:{port}", first, lambda h: True, 180)
        second = run_bat(root, env, "开启API服务.bat", "--port", str(port), "--offline", "--no-chatlog")
        out, _ = second.communicate(timeout=180)
        assert second.returncode == 1 and b"port may be in use" in out and b"server.log" in out
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200  # the first one still serves
    finally:
        stop(first, env)


def test_failing_starts_return_an_exit_code_and_the_message(unpacked):
    root, env = unpacked
    proc = run_bat(root, env, "start_low_vram.bat", "--quantize", "3")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and b"invalid choice: 3" in out and b"exit code 2" in out


def test_settings_ini_sets_the_port_for_a_double_click_user(unpacked):
    root, env = unpacked
    port = free_port()
    ini = root / "settings.ini"
    shipped = ini.read_bytes()
    ini.write_bytes(shipped.replace(b"port = 5178", f"port = {port}".encode()).replace(b"mirror = auto",
                                                                                       b"mirror = auto\r\noffline = true"))
    proc = run_bat(root, env, "开启API服务.bat", "--no-chatlog")
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}", proc, lambda h: h["status"] != "loading", 180)
        assert "Offline mode" in health["error"]  # offline = true came from the file too
    finally:
        stop(proc, env)
        ini.write_bytes(shipped)


def test_a_python_unzipped_by_hand_into_system_python_starts(unpacked):
    """The original instructions: unzip python.org's embeddable Python into system\\python. Its ._pth leaves out
    the bundle; the launcher's fix_pth.py sets it up, and the server starts."""
    root, env = unpacked
    pth = root / "system" / "python" / "python310._pth"
    shipped = pth.read_bytes()
    pth.write_bytes(b"python310.zip\r\n.\r\n\r\n# Uncomment to run site.main() automatically\r\n#import site\r\n")
    port = free_port()
    proc = run_bat(root, env, "start_low_vram.bat", "--port", str(port), "--offline", "--no-chatlog")
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc, lambda h: h["status"] != "loading", 180)
    finally:
        console = stop(proc, env)
        assert pth.read_bytes() == shipped, console
        pth.write_bytes(shipped)


def test_setup_offline_restores_a_deleted_package_without_network(unpacked):
    root, env = unpacked
    site = root / "system" / "python" / "Lib" / "site-packages"
    for path in [site / "waitress", *site.glob("waitress-*.dist-info")]:
        shutil.rmtree(path)
    proc = run_bat(root, env, "setup_offline.bat")
    out, _ = proc.communicate(timeout=600)
    text = out.decode("utf-8", errors="replace")
    assert proc.returncode == 0, text
    assert "--no-index" in text and "完成 / Done." in text
    assert (site / "waitress" / "__init__.py").is_file() and (site / "pip" / "__init__.py").is_file()
    port = free_port()
    proc = run_bat(root, env, "start_low_vram.bat", "--port", str(port), "--offline", "--no-chatlog")
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc, lambda h: h["status"] != "loading", 180)
    finally:
        stop(proc, env)


def test_the_cuda_index_probe_tells_an_answering_host_from_an_unreachable_one():
    import http.server
    import threading

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(405)  # an index that does not take HEAD still answered
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert install_deps.index_answers(f"http://127.0.0.1:{server.server_address[1]}/whl/cu128")
    finally:
        server.shutdown()
        server.server_close()
    assert not install_deps.index_answers(f"http://127.0.0.1:{free_port()}/whl/cu128", timeout=2)

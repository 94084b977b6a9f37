"""settings.ini: what a double-click user edits instead of flags (defaults < file < environment < flags)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, settings_from
from server.config import DEFAULT_MODEL_DIR, SETTINGS_FILE, Settings, UserError, from_file

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_the_shipped_file_is_commented_in_chinese_and_english_and_parses_to_the_defaults_users_expect():
    raw = SETTINGS_FILE.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # Notepad-friendly
    text = raw.decode("utf-8-sig")
    assert "镜像" in text and "mirror" in text and "端口" in text and "API key" in text
    changes = from_file(SETTINGS_FILE)
    assert set(changes) >= {"mirror", "port", "profile", "model", "open_browser", "host"}
    assert changes["mirror"] == "auto" and changes["port"] == 5178 and changes["open_browser"] is True
    assert "api_key" not in changes and "model_dir" not in changes  # empty = default
    assert Settings.from_changes(changes).model_dir == DEFAULT_MODEL_DIR  # THUDM/chatglm2-6b, as before
    assert Settings.from_changes({**changes, "model": "chatglm3-6b"}).model_dir.name == "chatglm3-6b"


def test_file_then_environment_then_flags(tmp_path):
    ini = write(tmp_path / "settings.ini", "[server]\nport = 6001\napi-key = secret\nmirror = https://hf-mirror.com\n"
                                          "max_queue = 3\n")
    environ = {"CHATGLM2_SETTINGS_FILE": str(ini), "CHATGLM2_MAX_QUEUE": "5"}
    settings = settings_from(build_parser().parse_args([]), environ=environ)
    assert (settings.port, settings.api_key, settings.mirror, settings.max_queue) == \
        (6001, "secret", "https://hf-mirror.com", 5)
    settings = settings_from(build_parser().parse_args(["--port", "7000"]), environ=environ)
    assert settings.port == 7000


def test_relative_model_folder_is_relative_to_the_file_and_gbk_from_old_notepad_is_read(tmp_path):
    ini = write(tmp_path / "settings.ini", "[server]\n; 模型文件夹\nmodel_dir = 模型\\chatglm2-6b\n", "gbk")
    assert from_file(ini)["model_dir"] == tmp_path / "模型\\chatglm2-6b"


@pytest.mark.parametrize("text, message", [
    ("[server]\nprot = 5178\n", "unknown setting 'prot'"),
    ("[server]\nport = five\n", "'port = five' is not valid"),
    ("[server]\nprofile = huge\n", "choose one of auto, low, mid, high"),
    ("[server]\nopen_browser = maybe\n", "not true or false"),
    ("port = 5178\n", "cannot be read"),  # no [server] section header
])
def test_mistakes_name_the_setting_and_the_file(tmp_path, text, message):
    ini = write(tmp_path / "settings.ini", text)
    with pytest.raises(UserError, match="settings.ini") as err:
        from_file(ini)
    assert message in str(err.value)


def test_a_broken_file_is_one_line_on_the_console_not_a_traceback(tmp_path):
    ini = write(tmp_path / "settings.ini", "[server]\nport = five\n")
    proc = subprocess.run([sys.executable, "-m", "server", "--offline"], capture_output=True, text=True,
                          encoding="utf-8", timeout=120, cwd=ROOT,
                          env={**os.environ, "CHATGLM2_SETTINGS_FILE": str(ini)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "设置文件有误" in proc.stderr and "'port = five' is not valid" in proc.stderr


def test_the_former_name_of_a_setting_still_works(tmp_path):
    """--cpu-backend became --cpu-kernels: settings files, variables and flags written for it still work."""
    from server.cli import build_parser
    from server.config import from_env, from_file

    ini = tmp_path / "settings.ini"
    ini.write_text("[server]\ncpu_backend = torch\n", encoding="utf-8")
    assert from_file(ini) == {"cpu_kernels": "torch"}
    assert from_env({"CHATGLM2_CPU_BACKEND": "onednn"}) == {"cpu_kernels": "onednn"}
    assert from_env({"CHATGLM2_CPU_KERNELS": "bnb", "CHATGLM2_CPU_BACKEND": "onednn"}) == {"cpu_kernels": "bnb"}
    for flag in ("--cpu-kernels", "--cpu-backend"):
        assert build_parser().parse_args([flag, "torch"]).cpu_kernels == "torch"

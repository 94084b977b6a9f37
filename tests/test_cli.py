"""Settings, profiles and the command line."""

import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, settings_from
from server.config import DEFAULT_MODEL_DIR, PROJECT_ROOT, Settings
from server.model.cpu_kernels import KernelChoice
from server.model.profiles import GIB, Hardware, plan_for

ROOT = Path(__file__).resolve().parents[1]


def test_default_model_dir_is_under_the_project_not_the_working_directory():
    assert DEFAULT_MODEL_DIR == ROOT / "THUDM" / "chatglm2-6b" and PROJECT_ROOT == ROOT


def test_help_explains_every_option():
    text = build_parser().format_help()
    for flag in ("--quantize", "--profile", "--device", "--dtype", "--model-dir", "--host", "--port",
                 "--max-context", "--max-queue"):
        assert flag in text
    assert "5178" in text and "127.0.0.1" in text


def test_flags_override_environment_which_overrides_defaults():
    args = build_parser().parse_args(["--port", "6000", "--quantize", "8"])
    settings = settings_from(args, environ={"CHATGLM2_PORT": "7000", "CHATGLM2_MAX_CONTEXT": "4096"})
    assert settings.port == 6000 and settings.quantize == 8 and settings.max_context == 4096
    assert settings.host == "127.0.0.1" and settings.profile == "auto"


def test_bad_flag_values_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quantize", "3"])


CPU = Hardware(cuda=False)


def gpu(free_gib, bf16=True):
    return Hardware(cuda=True, free_bytes=int(free_gib * GIB), bf16=bf16, name="Test GPU")


@pytest.mark.parametrize("changes, hardware, expected", [
    ({}, CPU, ("cpu", 4, "bfloat16", "low")),
    ({}, gpu(23.5), ("cuda", 16, "float16", "high")),
    ({}, gpu(11.0), ("cuda", 8, "float16", "mid")),
    ({}, gpu(7.6), ("cuda", 4, "float16", "low")),
    ({"profile": "mid"}, gpu(23.5), ("cuda", 8, "float16", "mid")),
    ({"profile": "high", "quantize": 4}, gpu(23.5), ("cuda", 4, "float16", "high")),
    ({"quantize": 0}, gpu(7.6), ("cuda", 16, "float16", "low")),
    ({"device": "cpu", "dtype": "float32"}, gpu(23.5), ("cpu", 4, "float32", "low")),
    ({"dtype": "bfloat16", "profile": "high"}, gpu(23.5), ("cuda", 16, "bfloat16", "high")),
])
def test_profiles(changes, hardware, expected):
    plan = plan_for(Settings().replace(**changes), hardware)
    assert (plan.device, plan.bits, plan.dtype, plan.profile) == expected
    assert plan.max_context == 8192 and plan.reason


@pytest.mark.parametrize("changes, hardware, message", [
    ({"device": "cuda"}, CPU, "no CUDA GPU"),
    ({"dtype": "bfloat16"}, gpu(23.5, bf16=False), "does not support bfloat16"),
])
def test_impossible_plans_say_why(changes, hardware, message):
    with pytest.raises(ValueError, match=message):
        plan_for(Settings().replace(**changes), hardware)


def test_terminal_chat_streams_and_keeps_history(tiny_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "server", "chat", "--model-dir", str(tiny_checkpoint), "--dtype", "float32",
         "--quantize", "16", "--max-context", "128"],
        input="你好\nclear\nhello\nexit\n", capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("答 / ChatGLM2: ") == 2 and "history cleared" in proc.stdout
    assert "[length]" in proc.stdout


def test_open_browser_opens_the_chat_page_once_listening(tmp_path):
    """The default browser is whatever $BROWSER names: here a command that writes down the address."""
    import os
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opened = tmp_path / "opened.txt"
    env = {**os.environ, "BROWSER": f"{sys.executable} -c \"import sys; open(r'{opened}', 'w').write(sys.argv[1])\" %s"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--open-browser", "--offline",
                             "--no-chatlog", "--model-dir", str(tmp_path / "none")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not opened.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert opened.read_text() == f"http://127.0.0.1:{port}/ui/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_http_layer_starts_without_the_model_stack():
    """The server answers HTTP before torch & co. are imported (and on machines where they fail to import)."""
    code = ("import sys, server.run, server.cli, server.chat; "
            "print(sorted(m for m in ('torch', 'transformers', 'sentencepiece', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("asked, bits, expected", [
    ("auto", 4, "torch"), ("auto", 8, "torch"), ("torch", 4, "torch"), ("bnb", 8, "bnb"), ("bnb", 4, "bnb"),
    ("onednn", 8, "torch"), ("fbgemm", 8, "torch"),  # torch's kernels, 8-bit on oneDNN's / FBGEMM's GEMM
])
def test_cpu_backend_follows_the_setting_and_the_measurements(asked, bits, expected):
    plan = plan_for(Settings(cpu_kernels=asked, quantize=bits), CPU)
    assert plan.device == "cpu" and plan.bits == bits and plan.backend == expected
    assert plan.int8_kernel == (asked if asked in ("torch", "fbgemm", "onednn") else "auto")
    assert plan_for(Settings(cpu_kernels=asked, quantize=16), CPU).backend == "dense"
    gpu = Hardware(cuda=True, free_bytes=6 * GIB, name="RTX 3060")
    assert plan_for(Settings(cpu_kernels=asked), gpu).backend == "bnb"  # the setting is about the CPU only


def kernels(int8: float, int4: float, bf16: float = 20.0, prompts: tuple[float, float] | None = None) -> KernelChoice:
    """Measured speeds as cpu_kernels.measure() reports them: ms for one token through a layer, and for a prompt
    through one matrix at (8, 4) bits."""
    return KernelChoice(int8="onednn", dense_from_tokens={8: 32, 4: 128},
                        decode_ms={"int8-onednn": int8, "int4": int4, "bfloat16": bf16},
                        prefill_ms={} if prompts is None else {"int8-onednn": prompts[0], "int4": prompts[1]})


@pytest.mark.parametrize("platform, speeds, ram_gib, profile", [
    ("linux", kernels(5.0, 5.2), 15.7, "mid"),  # plain AVX2 (Zen 3): 8-bit as fast as 4-bit, better quality
    ("linux", kernels(5.0, 4.8), 15.7, "mid"),  # within 10 %: more bits
    ("linux", kernels(10.0, 5.0), 15.7, "low"),  # int8 kernel twice as slow: 4-bit
    ("linux", kernels(8.5, 6.6, prompts=(4.6, 26.6)), 15.7, "mid"),  # AMX Xeon: 4-bit decodes faster, prompts 6x slower
    ("linux", kernels(8.5, 6.6, prompts=(27.0, 26.6)), 15.7, "low"),  # 4-bit faster at both
    ("linux", kernels(10.0, 5.0, prompts=(4.6, 26.6)), 15.7, "low"),  # 8-bit's decode 2x slower: not for prompts
    ("linux", kernels(8.5, 6.6, prompts=(4.6, 26.6)), 8, "low"),  # 8-bit does not fit
    ("linux", kernels(5.0, 5.2), 8, "low"),  # 8-bit does not fit
    ("linux", kernels(5.0, 5.2, bf16=5.1), 64, "high"),  # bfloat16 as fast, RAM for it
    ("win32", kernels(5.0, 20.0), 12, "mid"), ("win32", kernels(5.0, 20.0), 8, "low"),
    ("win32", kernels(30.0, 40.0, bf16=12.0), 32, "high"),  # torch's Windows kernels slow, bfloat16 fits
    ("linux", None, 15.7, "mid"), ("linux", None, 8, "low"),  # no measurement: 8-bit where it fits
])
def test_cpu_auto_profile_is_the_fastest_precision_that_fits(monkeypatch, platform, speeds, ram_gib, profile):
    import server.model.profiles

    monkeypatch.setattr(server.model.profiles.sys, "platform", platform)
    plan = plan_for(Settings(), Hardware(cuda=False, ram_bytes=int(ram_gib * GIB), kernels=speeds))
    assert plan.device == "cpu" and plan.profile == profile and plan.dtype == "bfloat16"
    assert plan.bits == {"high": 16, "mid": 8, "low": 4}[profile] and plan.backend == ("dense" if profile == "high"
                                                                                      else "torch")
    if speeds:
        assert "ms" in plan.reason  # the figures that decided are in the log line


def run_server_until(tmp_path, model_dir, words: str, timeout: float = 120) -> str:
    """Start `python -m server` on a free port; return its console output once `words` appear (bounded)."""
    import os
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "console.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--offline", "--no-chatlog",
                                 "--model-dir", str(model_dir), "--quantize", "16", "--dtype", "float32",
                                 "--max-context", "128"], cwd=ROOT, env=os.environ, stdout=out, stderr=out)
        try:
            deadline = time.time() + timeout
            while words not in log.read_text(encoding="utf-8", errors="replace") and time.time() < deadline:
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return log.read_text(encoding="utf-8", errors="replace").replace(str(port), "PORT")


def test_the_console_says_when_the_model_is_ready(tmp_path, tiny_checkpoint):
    console = run_server_until(tmp_path, tiny_checkpoint, "The model is ready")
    assert "The model is ready: chat at http://127.0.0.1:PORT/ui/ (cpu, float32, context 128 tokens)" in console
    assert "模型已就绪" in console and "Traceback" not in console


def test_the_console_says_plainly_when_loading_failed(tmp_path):
    console = run_server_until(tmp_path, tmp_path / "none", "keeps running only to show why")
    assert "Offline mode" in console and "Fix it and start again" in console and "Traceback" not in console

"""Settings: one definition that feeds the command line, environment variables, the settings file and tests.

Each field of `Settings` is an option. Its metadata carries the help text (and choices); `cli.py` turns every
field into a `--flag`, `from_env` reads `CHATGLM2_<FIELD>` variables and `from_file` the `[server]` section of
settings.ini (what a double-click user edits), so they cannot drift apart. Later sources win: defaults, then
settings.ini, then the environment, then flags.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError  # noqa: F401 (defined in errors.py, importable here too)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = PROJECT_ROOT / "THUDM" / "chatglm2-6b"
# --model NAME: the hub repository each name downloads (into THUDM/<name>/); the prompt format is read from the
# folder's own files (model/family.py); chatglm2-6b-int4's packed weights are read by model/packed_int4.py.
MODELS = {"chatglm2-6b": "THUDM/chatglm2-6b", "chatglm2-6b-int4": "THUDM/chatglm2-6b-int4",
          "chatglm2-6b-32k": "THUDM/chatglm2-6b-32k",
          "chatglm3-6b": "THUDM/chatglm3-6b", "chatglm3-6b-32k": "THUDM/chatglm3-6b-32k"}
ENV_PREFIX = "CHATGLM2_"
SETTINGS_FILE = PROJECT_ROOT / "settings.ini"
SETTINGS_FILE_ENV = "CHATGLM2_SETTINGS_FILE"  # another settings file (tests point it at their own)


def option(default, help: str, choices=None, env: str | None = None, repeat: bool = False, old_name: str = ""):
    """A settings field with the help text the CLI shows; `env` names an extra standard variable; a `repeat` flag
    may be given several times (the values are joined with commas, as the file and variables write them);
    `old_name` is the name it had before, still accepted as flag, setting and variable."""
    return field(default=default, metadata={"help": help, "choices": choices, "env": env, "repeat": repeat,
                                            "old_name": old_name})


@dataclass
class Settings:
    model: str = option("chatglm2-6b", "which model to run: sets --repo and --model-dir (THUDM/<name>) unless they "
                                       "are given", choices=tuple(MODELS))
    model_dir: Path = option(DEFAULT_MODEL_DIR, "model folder in the hub layout of THUDM/chatglm2-6b")
    repo: str = option("THUDM/chatglm2-6b", "hub repository downloaded when the model folder lacks files")
    revision: str = option("main", "branch, tag or commit of --repo to download")
    mirror: str = option("auto", "where the model is downloaded from: auto = huggingface.co, then "
                                 "https://hf-mirror.com, then ModelScope, the first that answers; a URL pins one hub "
                                 "(also the standard HF_ENDPOINT variable); modelscope pins ModelScope",
                         env="HF_ENDPOINT")
    offline: bool = option(False, "never touch the network; missing files are an error that names them "
                                  "(also HF_HUB_OFFLINE=1)", env="HF_HUB_OFFLINE")
    verify: bool = option(False, "re-check every model file against the hub's checksums (downloads bad ones again)")
    profile: str = option(
        "auto",
        "VRAM profile: low = 4-bit (<= 8 GB cards), mid = 8-bit (~10-12 GB), high = 16-bit (>= 14 GB); "
        "auto picks from the free memory of the device",
        choices=("auto", "low", "mid", "high"),
    )
    quantize: int | None = option(
        None, "weight precision in bits, overrides the profile (0 is a synonym of 16)", choices=(0, 4, 8, 16)
    )
    device: str = option("auto", "where the model runs; auto = CUDA when available, else CPU",
                         choices=("auto", "cuda", "cpu"))
    dtype: str = option(
        "auto",
        "compute dtype; auto = float16 on CUDA, bfloat16 on CPU; float32 gives the reference's exact logits",
        choices=("auto", "float16", "bfloat16", "float32"),
    )
    cpu_kernels: str = option(
        "auto",
        "what runs 4/8-bit weights on the CPU, quantized once and cached: torch = torch's own kernels; fbgemm / "
        "onednn = the same, 8-bit on FBGEMM's / oneDNN's int8 GEMM (refused where it is not exact); vnni = the "
        "same, 4-bit on the VNNI kernel (needs numba and a CPU with VNNI); bnb = bitsandbytes (NF4 / LLM.int8); "
        "auto = torch's kernels, 8-bit and 4-bit each on the kernel measured fastest at start, or bnb with "
        "--dtype float32 (see docs/performance.md). Formerly --cpu-backend, still accepted",
        choices=("auto", "torch", "fbgemm", "onednn", "vnni", "bnb"), old_name="cpu_backend",
    )
    threads: int = option(
        0, "CPU threads the model computes with; 0 = automatic: one per physical core, on a hybrid CPU (Intel Core "
           "12th gen and later, Apple M) the performance cores only (an OMP_NUM_THREADS in the environment is kept)")
    backend: str | None = option(
        None, "generate on OpenAI-compatible engines (vLLM, SGLang, llama.cpp's server) instead of a local model: "
              "their base URLs, e.g. http://gpu-host:8000/v1 (comma-separated or repeated; each request goes to "
              "the least busy). The model folder then needs only tokenizer.model (no weights, no torch)",
        repeat=True)
    backend_key: str | None = option(None, "API key sent to the --backend engines (as 'Authorization: Bearer')")
    max_context: int | None = option(None, "context budget in tokens (prompt + reply); default: 32768 for the 32k "
                                           "models, else the profile's 8192; less when the free memory cannot hold "
                                           "it (with --backend: the smallest context the engines report, else 8192)")
    max_queue: int = option(8, "jobs that may wait for the model; more are refused as busy")
    max_batch: int = option(
        0, "requests decoded together in one step (continuous batching); 0 = automatic: 4 on a CPU, 8 on a GPU, "
           "fewer when the free memory does not hold them at the full context; 1 = one at a time")
    prefill_chunk: int = option(
        0, "prompt tokens run with each decode step while other replies stream (chunked prefill: a long prompt "
           "does not stall them; on a CPU in the same forward pass, the replies' tokens counted in, on a GPU "
           "between two steps); 0 = automatic: 16 on a CPU, 2048 on a GPU. On a CPU a prompt longer than the "
           "model's layers times this many tokens, whose rows make the quantized layers expand their weights, runs "
           "one layer per step instead, in pieces whose pass costs no more than a chunk's")
    prompt_cache_mb: int | None = option(
        None, "RAM (MB) for the keys and values of recent conversations, so that the next turn computes only its "
              "new tokens; 0 turns it off; default 1024 (less on PCs with under 16 GB of RAM)")
    prompt_cache_disk_mb: int | None = option(
        None, "disk space (MB) in the model folder for the prompt cache, so that a conversation continues fast "
              "after a restart; 0 turns it off; default 2048 where the disk has 8 GB free")
    reply_reserve: int = option(512, "tokens kept free for the reply when old history rounds are dropped")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = option(5178, "TCP port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer <key>' on every route but / and /health")
    allow_origin: str | None = option(
        None, "web page origins (scheme://host:port, comma-separated or repeated; * for any) allowed to call the "
              "API from a browser, besides loopback origins and the server's own page", repeat=True)
    max_body_bytes: int = option(2 * 1024 * 1024, "largest request body accepted, in bytes")
    write_timeout: int = option(60, "seconds a client may stop reading a streamed reply before its job is stopped "
                                    "and its thread freed")
    open_browser: bool = option(False, "open the chat page /ui/ in the default browser once the server listens")
    chatlog: bool = option(True, "write full queries and replies to chatlog.log (--no-chatlog turns it off)")

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_changes(cls, changes: dict) -> Settings:
        """Settings with `changes`; a chosen model brings its repository and folder unless those are given."""
        model = changes.get("model")
        if model and model in MODELS:
            changes = {"repo": MODELS[model], "model_dir": PROJECT_ROOT / "THUDM" / model, **changes}
        return cls().replace(**changes)


def settings_fields():
    return dataclasses.fields(Settings)


def parse_value(f: dataclasses.Field, raw: str):
    """Convert a string (from the CLI or the environment) to the field's type."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "Path" in kind:
        return Path(raw)
    if "bool" in kind:
        word = raw.strip().lower()
        if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"'{raw}' is not true or false")
        return word in ("1", "true", "yes", "on")
    if "int" in kind:
        return int(raw)
    return raw


def field_named(name: str) -> dataclasses.Field | None:
    """The field of this name, or of its former name (settings files written for an older release)."""
    name = name.strip().lower().replace("-", "_")
    return next((f for f in settings_fields() if name in (f.name, f.metadata.get("old_name"))), None)


def from_file(path: Path | None = None, environ=None) -> dict:
    """Settings from the [server] section of settings.ini (or $CHATGLM2_SETTINGS_FILE), as a dict of changes.

    Empty values keep the default. The file may be saved by Notepad as UTF-8 (with or without BOM) or GBK.
    """
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get(SETTINGS_FILE_ENV) or SETTINGS_FILE)
    if not path.is_file():
        return {}
    try:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("gbk")
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
        parser.read_string(text, source=str(path))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise UserError(f"设置文件有误 / {path} cannot be read: {exc}. Fix it, or delete it to use the defaults.") \
            from exc
    changes = {}
    for key, value in (parser["server"].items() if parser.has_section("server") else []):
        f = field_named(key)
        if f is None:
            known = ", ".join(f.name for f in settings_fields())
            raise UserError(f"设置文件有误 / {path}: unknown setting '{key}'. Known settings: {known}.")
        if value.strip() == "":
            continue
        try:
            value = check_choice(f, parse_value(f, value.strip()))
            changes[f.name] = path.parent / value if isinstance(value, Path) else value  # relative to the file
        except ValueError as exc:
            raise UserError(f"设置文件有误 / {path}: '{key} = {value.strip()}' is not valid ({exc}).") from exc
    return changes


def check_choice(f: dataclasses.Field, value):
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"choose one of {', '.join(map(str, choices))}")
    return value


def from_env(environ=None) -> dict:
    """Settings given as CHATGLM2_<FIELD> (or a field's standard variable), as a dict of changes."""
    environ = os.environ if environ is None else environ
    changes = {}
    for f in settings_fields():
        old = f.metadata.get("old_name")
        for name in (ENV_PREFIX + f.name.upper(), f.metadata.get("env"), old and ENV_PREFIX + old.upper()):
            if name and environ.get(name, "") != "":
                try:
                    changes[f.name] = check_choice(f, parse_value(f, environ[name]))
                except ValueError as exc:
                    raise UserError(f"环境变量有误 / {name}={environ[name]} is not valid ({exc}).") from exc
                break
    return changes

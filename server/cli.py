"""`python -m server`: the command line. Every option comes from `Settings` (see config.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import (
    ENV_PREFIX,
    PROJECT_ROOT,
    SETTINGS_FILE,
    Settings,
    UserError,
    from_env,
    from_file,
    parse_value,
    settings_fields,
)
from .logfile import LogFile

log = logging.getLogger("server")
LOG_PATH = PROJECT_ROOT / "server.log"


class Console(logging.StreamHandler):
    """The console as it is when a record is written: sys.stderr may have been replaced since (a test runner's
    capture, closed after its test, would otherwise get every later line as a "Logging error" traceback)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging() -> None:
    """Info on the console; everything, tracebacks included, in server.log (what the launchers point to). Called
    again (main() run twice in one process), it replaces its handlers instead of adding more."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "from_setup_logging", False)]:
        root.removeHandler(handler)
        handler.close()
    console = Console()
    console.setLevel(logging.INFO)
    handlers = [console]
    try:
        file = LogFile(LOG_PATH, max_bytes=5 * 1024 * 1024, backups=2)
        file.setLevel(logging.DEBUG)
        handlers.append(file)
    except OSError:  # a read-only folder: console only
        pass
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        handler.from_setup_logging = True
        handler.setFormatter(fmt)
        root.addHandler(handler)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="my-chatglm2: a local ChatGLM2-6B chat server. Every option can also be set in "
                    f"{SETTINGS_FILE.name} beside the launchers (section [server], e.g. port = 5178) or as an "
                    f"environment variable {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}PORT=5178); flags win over "
                    "variables, variables over the file.",
    )
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "chat", "export"),
                        help="serve: the HTTP API (default); chat: chat in this terminal; export DIR: write the "
                             "model as a standard Hugging Face folder (--dtype float16, bfloat16 or float32)")
    parser.add_argument("target", nargs="?", help="export: the folder to write")
    defaults = Settings()
    for f in settings_fields():
        default = getattr(defaults, f.name)
        if isinstance(default, Path) and default.is_relative_to(PROJECT_ROOT):
            default = f"{default.relative_to(PROJECT_ROOT).as_posix()} in the project folder"
        shown = "" if default is None else f" (default: {default})"
        kwargs = {"help": f.metadata["help"] + shown, "dest": f.name, "default": None}
        if "bool" in str(f.type):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("repeat"):
            kwargs["action"] = "append"
        else:
            kwargs["type"] = lambda raw, f=f: parse_value(f, raw)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        names = ["--" + name.replace("_", "-") for name in (f.name, f.metadata.get("old_name")) if name]
        parser.add_argument(*names, **kwargs)
    return parser


def settings_from(args: argparse.Namespace, environ=None) -> Settings:
    """Defaults, then settings.ini, then environment variables, then command-line flags."""
    changes = from_file(environ=environ)
    changes.update(from_env(environ))
    flags = {f.name: getattr(args, f.name) for f in settings_fields() if getattr(args, f.name) is not None}
    changes.update({name: ",".join(v) if isinstance(v, list) else v for name, v in flags.items()})
    return Settings.from_changes(changes)


def run_export(settings: Settings, target: str | None) -> int:
    """Download what is missing, convert once, and write the export folder."""
    if not target:
        raise UserError("导出需要目标文件夹 / export needs a folder: python -m server export DIR")
    from .model.export import export
    from .setup.bootstrap import ensure_model

    ensure_model(settings)
    try:
        out = export(settings.model_dir, Path(target), "float16" if settings.dtype == "auto" else settings.dtype)
    except (FileExistsError, ValueError) as exc:
        raise UserError(f"无法导出 / Cannot export: {exc}") from exc
    print(f"已导出 / exported: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # Chinese text on any console code page
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        settings = settings_from(args)
        if args.command == "chat":
            from .chat import run_chat

            return run_chat(settings)
        if args.command == "export":
            return run_export(settings, args.target)
        from .run import run_server

        return run_server(settings)
    except UserError as exc:
        print(f"\n{exc}\n(详细日志 / details: {LOG_PATH})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

"""The layers of server/ as folders, and the import rules between them (docs/architecture.md).

Static: every `import` in a module (at the top or inside a function) is read with `ast`, so a lazy import that
breaks a rule is caught too. Dynamic: importing the HTTP and set-up layers does not load torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server"
# What each layer may import from the package (itself always). Lower layers never import higher ones.
ALLOWED = {
    "config": set(),
    "model": {"config"},
    "setup": {"config", "model"},  # model.checkpoint's file lists only (no torch: test below)
    "engine": {"config", "model"},
    "upstream": {"config", "engine", "model"},
    "web": {"config", "engine", "model", "upstream"},
    "top": {"config", "model", "setup", "engine", "upstream", "web"},  # cli, run, startup, chat: the wiring
}
TORCH_FREE = ["web", "setup", "upstream"]  # they run before torch is imported, or where it is not installed


def layer_of(module: str) -> str:
    """'server.web.app' -> 'web'; the top-level modules other than config are the wiring ('top')."""
    parts = module.split(".")
    if len(parts) == 1:  # server/__init__.py: the version only
        return "config"
    if len(parts) > 2 or (SERVER / parts[1]).is_dir():
        return parts[1]
    return "config" if parts[1] in ("config", "errors") else "top"  # (errors.py: every exception type)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """The server.* modules `path` imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("server.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "server":  # from server import x / from .. import x
                found |= {f"server.{alias.name}" for alias in node.names if alias.name != "__version__"}
            elif base.startswith("server."):
                found.add(base)
    return found


MODULES = sorted(p for p in SERVER.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVER)))
def test_no_module_imports_a_layer_above_its_own(path):
    mine = layer_of(module_name(path))
    for target in imported(path):
        theirs = layer_of(target)
        assert theirs == mine or theirs in ALLOWED[mine], f"{module_name(path)} ({mine}) imports {target} ({theirs})"


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in SERVER.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ALLOWED) - {"config", "top"}


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_the_http_setup_and_front_end_layers_import_no_torch(layer):
    modules = [module_name(p) for p in sorted((SERVER / layer).rglob("*.py"))]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            "print(sorted(m for m in ('torch', 'transformers', 'sentencepiece', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_both_engines_keep_the_engine_contract():
    """The HTTP layer is written against engine/contract.GenerationEngine; both engines must provide all of it."""
    from server.engine import Engine
    from server.engine.contract import GenerationEngine
    from server.upstream import UpstreamEngine

    local, front = Engine(), UpstreamEngine(["http://127.0.0.1:9/v1"])
    try:
        for engine in (local, front):
            assert isinstance(engine, GenerationEngine), type(engine).__name__
            engine.set_state("downloading", progress=0.5)
            engine.add_notice("a notice")
            assert (engine.state, engine.detail, engine.notices) == ("downloading", {"progress": 0.5}, ["a notice"])
        assert local.constrained_decoding and not front.constrained_decoding
    finally:
        front.close()

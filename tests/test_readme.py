"""README and docs/ are the truth: the options block is the real --help, every endpoint is documented, CI runs the
README's test command, the architecture guide names only modules that exist, and every docs link resolves."""

import re
from pathlib import Path

import pytest

from server.cli import build_parser
from server.config import Settings
from server.engine import Engine
from server.web.app import create_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_options_block_is_the_real_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    block = re.search(r"<!-- help:start -->\n```text\n(.*?)```\n<!-- help:end -->", doc("configuration.md"),
                      re.S).group(1)
    assert block == build_parser().format_help(), "run: COLUMNS=100 python -m server --help, and paste it"


def test_every_route_is_documented():
    app = create_app(Settings(), Engine())
    api = "".join(doc(name) for name in ("api.md", "openai.md", "ollama.md", "chat-page.md"))  # (the page's routes with the page)
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or "<" in rule.rule or rule.rule in ("/ui", "/ui/pygments.css"):
            continue  # the page's own files
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert f"`{method} {rule.rule}`" in api, f"docs lack {method} {rule.rule}"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^(\./test\.sh)\s+# ", README, re.M).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()


def test_the_front_door_stays_short_and_has_what_a_newcomer_looks_for():
    first_screen = "\n".join(README.splitlines()[:60])
    for needed in ("win64-cpu.zip", "开启API服务.bat", "使用说明.txt", "http://127.0.0.1:5178/ui/", "./test.sh"):
        assert needed in first_screen, needed
    assert "curl" in README and "OpenAI(" in README
    assert len(README.splitlines()) <= 160


def test_the_architecture_guide_names_only_modules_that_exist():
    guide = doc("architecture.md")
    named = set(re.findall(r"`((?:server/|tests/)?[\w/]+\.py)`", guide))
    assert len(named) > 20
    for name in named:
        roots = [ROOT] if name.startswith(("server/", "tests/")) else [ROOT / "server"]
        candidates = [root / name for root in roots] + list((ROOT / "server").rglob(name))
        assert any(p.is_file() for p in candidates), f"docs/architecture.md names {name}, which is gone"


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_relative_links_resolve(page):
    path = ROOT / page if page == "README.md" else DOCS / page
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"

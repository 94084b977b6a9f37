"""README is the truth: its options block is the real --help, every endpoint is documented, CI runs its test command."""

import re
from pathlib import Path

from server.cli import build_parser
from server.config import Settings
from server.engine import Engine
from server.web.app import create_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_options_block_is_the_real_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    block = re.search(r"<!-- help:start -->\n```text\n(.*?)```\n<!-- help:end -->", README, re.S).group(1)
    assert block == build_parser().format_help(), "run: COLUMNS=100 python -m server --help, and paste it"


def test_every_route_is_documented():
    app = create_app(Settings(), Engine())
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or "<" in rule.rule or rule.rule in ("/ui", "/ui/pygments.css"):
            continue  # the page's own files
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert f"`{method} {rule.rule}`" in README, f"README lacks {method} {rule.rule}"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^(\./test\.sh)\s+# ", README, re.M).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()

"""A broken model folder is one clear line naming the file and the fix: never a traceback, never a wrong hint."""

import json
import shutil

import pytest

from server.config import Settings, UserError
from server.startup import load_for
from tests.checkpoint_factory import write_checkpoint
from tests.test_cli import run_server_until


@pytest.fixture
def folder(tmp_path, tiny_checkpoint):
    copy = tmp_path / "chatglm2-6b"
    shutil.copytree(tiny_checkpoint, copy, ignore=shutil.ignore_patterns("converted*"))
    return copy


def settings(folder, **changes):
    return Settings(model_dir=folder, offline=True, quantize=16, dtype="float32", max_context=128, **changes)


BREAKAGES = {
    "empty config": (lambda f: (f / "config.json").write_text("{}"), ["config.json", "lacks 'kv_channels'"]),
    "bad config value": (lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((f / "config.json").read_text()), "kv_channels": "many"})), ["config.json", "wrong kind"]),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), ["config.json", "not valid JSON"]),
    "index not JSON": (lambda f: (f / "pytorch_model.bin.index.json").write_text("<html>"),
                       ["pytorch_model.bin.index.json", "not a weight index"]),
    "tokenizer not sentencepiece": (lambda f: (f / "tokenizer.model").write_bytes(b"<html>404</html>"),
                                    ["tokenizer.model", "not a sentencepiece model"]),
    "tokenizer empty": (lambda f: (f / "tokenizer.model").write_bytes(b""), ["tokenizer.model"]),
    "shard not a torch file": (lambda f: (f / "pytorch_model-00001-of-00002.bin").write_bytes(b"<html>502</html>"),
                               ["pytorch_model-00001-of-00002.bin", "damaged or incomplete"]),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_each_breakage_names_the_file_and_the_fix(folder, name):
    breakage, words = BREAKAGES[name]
    breakage(folder)
    with pytest.raises(UserError) as err:
        load_for(settings(folder))
    message = str(err.value)
    for word in words:
        assert word in message, message
    assert "arbitrary code" not in message and "\n" not in message.strip()


def test_a_folder_that_cannot_be_written_says_where_to_put_the_model(folder, monkeypatch):
    """(Tests run as root, for whom no folder is read-only: the refusal is what the OS would answer.)"""
    from pathlib import Path

    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.parent == folder and self.name.startswith(".converted"):
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError, match="cannot write the converted copy.*Permission denied.*model_dir"):
        load_for(settings(folder))


def test_verify_offline_says_it_needs_the_network(folder):
    with pytest.raises(UserError, match="--verify .* needs the network"):
        load_for(settings(folder, verify=True))


@pytest.mark.parametrize("name", BREAKAGES)
def test_the_console_shows_one_line_and_no_traceback(tmp_path, folder, name):
    breakage, words = BREAKAGES[name]
    breakage(folder)
    console = run_server_until(tmp_path, folder, "keeps running only to show why")
    lines = [line for line in console.splitlines() if all(word in line for word in words)]
    assert len(lines) == 1 and "Traceback" not in console, console


def test_a_fresh_checkpoint_still_loads(tmp_path):
    loaded = load_for(settings(write_checkpoint(tmp_path / "fresh")))
    assert loaded.plan.precision == "float32"

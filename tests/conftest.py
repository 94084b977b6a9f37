"""Fixtures: tiny ChatGLM2 checkpoints in the hub layout, loaded models, engines, an isolated environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.engine import Engine
from server.model import load_model
from server.profiles import Plan
from tests.checkpoint_factory import write_checkpoint

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "chatglm2" / "tokenizer.model"


def cpu_plan(bits: int = 16, dtype: str = "float32", max_context: int = 256) -> Plan:
    return Plan(device="cpu", bits=bits, dtype=dtype, max_context=max_context, profile="test", reason="test")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the user's settings, hub token or caches."""
    for name in list(os.environ):
        if name.startswith(("CHATGLM2_", "HF_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose replies never end before max_length (eos is always unlikely)."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm2-tiny"))


@pytest.fixture(scope="session")
def eos_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose every reply ends at once with eos."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm2-eos"), eos_bias=30.0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, cpu_plan())


@pytest.fixture
def engine_for():
    """engine_for(loaded, **options) -> a running Engine, closed after the test."""
    engines = []

    def make(loaded, **options):
        engine = Engine(**options)
        engine.attach(loaded)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(engine_for, tiny_model):
    return engine_for(tiny_model)

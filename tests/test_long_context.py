"""The 32k models: their context by default, long prompts in bounded pieces, and a context the memory can hold."""

import json

import pytest

from server.config import Settings
from server.engine import sizing
from server.engine.budget import GenerationRequest
from server.model.loader import load_model
from server.model.profiles import Hardware, plan_for
from tests.checkpoint_factory import write_checkpoint
from tests.conftest import cpu_plan


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A tiny model with the 32k models' config: 32,768 positions, stretched by rope_ratio."""
    return write_checkpoint(tmp_path_factory.mktemp("glm-32k") / "ckpt", seq_length=32768, rope_ratio=16)


def test_the_32k_models_default_to_their_context(long_checkpoint, tiny_checkpoint):
    cpu = Hardware(cuda=False, ram_bytes=64 << 30)
    assert plan_for(Settings(model_dir=long_checkpoint), cpu).max_context == 32768
    assert plan_for(Settings(model_dir=long_checkpoint, max_context=4096), cpu).max_context == 4096
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert "rope_ratio" not in config  # ChatGLM2-6B: its 8k conversations, whatever its position table says
    assert plan_for(Settings(model_dir=tiny_checkpoint), cpu).max_context == 8192


def test_a_long_prompt_runs_in_bounded_pieces(engine_for, long_checkpoint, monkeypatch, prefill_lengths):
    pieces = prefill_lengths
    monkeypatch.setattr(sizing, "PROMPT_PIECE", 256)  # (the engine reads it from its module below)
    from server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "PROMPT_PIECE", 256)
    engine = engine_for(load_model(long_checkpoint, cpu_plan(max_context=32768)))
    pieces.clear()  # (the warm-up's, and the chat template's start, now in the prefix cache)
    done = engine.submit(GenerationRequest(query="你好 " * 600, max_new_tokens=3, temperature=0)).wait(timeout=120)
    assert done.finish_reason == "length" and done.prompt_tokens > 600
    assert done.cached_tokens == len(engine.loaded.tokenizer.conversation_start())
    # nothing ran whole, every token not from the cache ran once
    assert max(pieces) <= 256 and sum(pieces) == done.prompt_tokens - done.cached_tokens


def test_a_context_the_memory_cannot_hold_is_lowered_and_refused_clearly(engine_for, long_checkpoint, monkeypatch):
    loaded = load_model(long_checkpoint, cpu_plan(max_context=32768))
    per_token = sizing.kv_bytes_per_token(loaded)
    # a machine whose free memory holds the reserve and the keys and values of 3,000 tokens
    monkeypatch.setattr(sizing, "free_memory", lambda device: sizing.RESERVE_BYTES["cpu"] + 3000 * per_token)
    engine = engine_for(loaded, prompt_cache_mb=0)
    assert engine.max_context == 2048
    from server.errors import ContextOverflow

    with pytest.raises(ContextOverflow):
        engine.submit(GenerationRequest(query="你好 " * 3000, max_length=32768))

"""Checkpoint conversion: the native GLM model must give the ChatGLM2 reference's logits exactly in float32."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.model import convert, disk
from server.model.convert import ConversionError, cache_dir, ensure_converted
from server.model.loader import ModelLoadError, load_model
from tests.checkpoint_factory import write_checkpoint
from tests.conftest import cpu_plan


def load_reference_state(folder):
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(torch.load(folder / shard, weights_only=True))
    return {k: v.float() for k, v in state.items()}


def rmsnorm(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_pairs(x, positions, rope_theta):
    """ChatGLM2 rotary: adjacent pairs of the first half of each head's dimensions; the rest passes through."""
    d = x.shape[-1]
    rot = d // 2
    out = x.clone()
    for i in range(rot // 2):
        angle = positions * rope_theta ** (-2 * i / rot)  # [T]
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * cos - b * sin
        out[..., 2 * i + 1] = a * sin + b * cos
    return out


def reference_logits(state, cfg, ids):
    """The ChatGLM2 forward pass written from its description, independent of transformers."""
    heads, groups, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, theta = cfg["layernorm_epsilon"], 10000 * cfg.get("rope_ratio", 1)
    T = len(ids)
    positions = torch.arange(T, dtype=torch.float32)
    x = state["transformer.embedding.word_embeddings.weight"][ids]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for layer in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{layer}."
        h = rmsnorm(x, state[p + "input_layernorm.weight"], eps)
        qkv = h @ state[p + "self_attention.query_key_value.weight"].T + state[p + "self_attention.query_key_value.bias"]
        q = qkv[:, : heads * d].view(T, heads, d)
        k = qkv[:, heads * d: (heads + groups) * d].view(T, groups, d)
        v = qkv[:, (heads + groups) * d:].view(T, groups, d)
        q, k = rotate_pairs(q, positions, theta), rotate_pairs(k, positions, theta)
        outs = []
        for head in range(heads):
            g = head // (heads // groups)
            scores = q[:, head] @ k[:, g].T / math.sqrt(d) + causal
            outs.append(torch.softmax(scores, -1) @ v[:, g])
        x = x + torch.cat(outs, -1) @ state[p + "self_attention.dense.weight"].T
        h = rmsnorm(x, state[p + "post_attention_layernorm.weight"], eps)
        a, b = (h @ state[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(a) * b) @ state[p + "mlp.dense_4h_to_h.weight"].T
    x = rmsnorm(x, state["transformer.encoder.final_layernorm.weight"], eps)
    return x @ state["transformer.output_layer.weight"].T


@pytest.mark.parametrize("rope_ratio", [1, 50])
def test_native_model_reproduces_reference_logits(tmp_path, rope_ratio):
    folder = write_checkpoint(tmp_path / "ckpt", seed=3)
    cfg = json.loads((folder / "config.json").read_text())
    if rope_ratio != 1:
        cfg["rope_ratio"] = rope_ratio
        (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(folder, cpu_plan())
    ids = loaded.tokenizer.build_prompt("今天天气怎么样？", [("你好", "你好！有什么可以帮你的吗？")])
    assert len(ids) > 20

    native = loaded.model(torch.tensor([ids])).logits[0]
    expected = reference_logits(load_reference_state(folder), cfg, ids)
    assert native.dtype == torch.float32
    torch.testing.assert_close(native, expected, rtol=1e-4, atol=1e-4)
    # and a wrong rope base would not pass: the comparison is sensitive to the position encoding
    cfg_wrong = dict(cfg, rope_ratio=rope_ratio * 2)
    assert not torch.allclose(native, reference_logits(load_reference_state(folder), cfg_wrong, ids), atol=1e-3)


def test_conversion_is_cached_and_redone_when_the_source_changes(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    converted = ensure_converted(folder)
    stamp = (converted / "source.json").stat().st_mtime_ns
    assert ensure_converted(folder) == converted
    assert (converted / "source.json").stat().st_mtime_ns == stamp  # not converted again

    cfg = json.loads((folder / "config.json").read_text())
    cfg["layernorm_epsilon"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))
    ensure_converted(folder)
    assert json.loads((converted / "config.json").read_text())["rms_norm_eps"] == 1e-6


def test_interrupted_conversion_leaves_nothing_to_load(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "ckpt")
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user closed the window mid-conversion
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(folder)
    assert not cache_dir(folder).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".converted")]
    monkeypatch.undo()
    assert (ensure_converted(folder) / "model.safetensors.index.json").exists()


def test_conversion_writes_the_native_names_and_splits_qkv(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", shards=3)
    converted = ensure_converted(folder)
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.weight",
            "lm_head.weight", "model.embed_tokens.weight"} <= names
    assert not any("query_key_value" in n or "inv_freq" in n for n in names)
    assert len(set(index["weight_map"].values())) == 3  # one output shard per source shard
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "glm" and config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.5}


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-single", "safetensors-single"])
def test_other_weight_layouts_load_to_the_same_logits(tmp_path, tiny_checkpoint, tiny_model, layout):
    folder = tmp_path / layout
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("converted", "pytorch_model*"))
    state = load_reference_state(tiny_checkpoint)
    state = {k: v.half() if "inv_freq" not in k else v for k, v in state.items()}
    if layout == "safetensors-sharded":
        names = sorted(state)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for shard, keys in parts.items():
            save_file({k: state[k] for k in keys}, str(folder / shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: s for s, keys in parts.items() for k in keys}}))
    elif layout == "bin-single":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    loaded = load_model(folder, cpu_plan())
    ids = torch.tensor([loaded.tokenizer.build_prompt("hello", [])])
    torch.testing.assert_close(loaded.model(ids).logits, tiny_model.model(ids).logits)


def test_unexpected_tensor_is_refused_with_its_name(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", shards=1)
    shard = folder / "pytorch_model-00001-of-00001.bin"
    state = torch.load(shard, weights_only=True)
    state["transformer.encoder.layers.0.self_attention.query_key_value.weight_scale"] = torch.ones(3)
    torch.save(state, shard)
    with pytest.raises(ConversionError, match="unexpected tensor .*query_key_value.weight_scale"):
        ensure_converted(folder)


def test_missing_tensor_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", shards=1)
    shard = folder / "pytorch_model-00001-of-00001.bin"
    state = torch.load(shard, weights_only=True)
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(state, shard)
    with pytest.raises(ConversionError, match="lacks tensors: model.layers.1.mlp.down_proj.weight"):
        ensure_converted(folder)


def test_loading_is_strict_about_the_converted_cache(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", shards=1)
    shard = ensure_converted(folder) / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        load_model(folder, cpu_plan())


def test_missing_files_are_listed(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    (folder / "tokenizer.model").unlink()
    assert convert.missing_files(folder) == ["tokenizer.model", "pytorch_model-00002-of-00002.bin"]
    with pytest.raises(ConversionError, match="lacks tokenizer.model"):
        ensure_converted(folder)


def test_disk_space_is_checked_before_converting(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(ConversionError, match="not enough disk space"):
        ensure_converted(folder)
    assert not cache_dir(folder).exists()

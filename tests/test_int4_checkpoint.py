"""THUDM/chatglm2-6b-int4: its packed int4 weights read without cpm_kernels, exactly as the reference unpacks them."""

import dataclasses
import json

import pytest
import torch

from server.config import Settings
from server.model import convert, packed_int4
from server.model.cpu_quant import Int4Linear, Int8Linear
from server.model.loader import cache_format, load_model
from server.model.profiles import Hardware, plan_for
from tests.checkpoint_factory import INT4_LINEARS, write_checkpoint, write_int4_checkpoint
from tests.conftest import cpu_plan
from tests.test_convert import reference_logits


def reference_unpack(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference kernel's arithmetic, byte by byte in plain Python: high = byte >> 4 and
    low = (byte << 4) >> 4 on signed 8-bit values; w = value * scale (float32)."""
    def signed(nibble):
        return nibble - 16 if nibble >= 8 else nibble

    rows = []
    for row, s in zip(packed.tolist(), scale.float().tolist()):
        values = []
        for byte in row:
            byte &= 0xFF
            values += [signed(byte >> 4), signed(byte & 0xF)]
        rows.append([v * s for v in values])
    return torch.tensor(rows, dtype=torch.float32)


def reference_state(folder) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    dense = {}
    for name, tensor in state.items():
        if name.endswith("_scale"):
            continue
        dense[name] = reference_unpack(tensor, state[name + "_scale"]) if name.endswith(INT4_LINEARS) \
            else tensor.float()
    return dense


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    source = write_checkpoint(tmp_path_factory.mktemp("float") / "ckpt", seed=5)
    return write_int4_checkpoint(tmp_path_factory.mktemp("int4") / "chatglm2-6b-int4", source)


def test_nibbles_unpack_high_first_and_signed():
    packed = torch.tensor([[0x7F, 0x80 - 256, 0x18, 0x00]], dtype=torch.int8)
    assert packed_int4.unpack(packed).tolist() == [[7, -1, -8, 0, 1, -8, 0, 0]]


def test_float32_logits_and_greedy_reply_equal_the_dequantized_reference(int4_checkpoint):
    cfg = json.loads((int4_checkpoint / "config.json").read_text())
    loaded = load_model(int4_checkpoint, cpu_plan(16, "float32"))
    assert cache_format(loaded.plan, packed=True) == "float32"
    state = reference_state(int4_checkpoint)
    ids = loaded.tokenizer.build_prompt("今天天气怎么样？", [("你好", "你好！")])
    torch.testing.assert_close(loaded.model(torch.tensor([ids])).logits[0], reference_logits(state, cfg, ids),
                               rtol=1e-4, atol=1e-4)

    ours, theirs = list(ids), list(ids)
    for _ in range(12):
        ours.append(int(loaded.model(torch.tensor([ours])).logits[0, -1].argmax()))
        theirs.append(int(reference_logits(state, cfg, theirs)[-1].argmax()))
    assert ours == theirs


def test_float16_cache_holds_the_reference_half_precision_unpacking(int4_checkpoint):
    from safetensors import safe_open

    converted = convert.ensure_converted(int4_checkpoint, "float16")
    state = torch.load(int4_checkpoint / "pytorch_model.bin", weights_only=True)
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    expected = reference_unpack(state[name], state[name + "_scale"]).half()  # each product rounded once to half
    shards = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(converted / shards["model.layers.1.mlp.down_proj.weight"]), "pt") as f:
        stored = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert stored.dtype == torch.float16 and torch.equal(stored, expected)


def test_cpu_caches_keep_the_integers(int4_checkpoint):
    state = torch.load(int4_checkpoint / "pytorch_model.bin", weights_only=True)
    name = "transformer.encoder.layers.0.self_attention.dense.weight"
    exact = reference_unpack(state[name], state[name + "_scale"])
    scale_bf16 = state[name + "_scale"].to(torch.bfloat16).float()

    # torch's int8 kernel reads the integers where they lie (oneDNN's, when measured faster, repacks them)
    eight = load_model(int4_checkpoint, dataclasses.replace(cpu_plan(8, "bfloat16"), int8_kernel="torch"))
    layer = eight.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, Int8Linear)
    assert torch.equal(layer.weight_int8.float() * state[name + "_scale"].float()[:, None], exact)
    assert torch.equal(layer.scales.float(), scale_bf16)  # the only rounding: the scale in bfloat16

    four = load_model(int4_checkpoint, cpu_plan(4, "bfloat16"))
    layer = four.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, Int4Linear)
    values = reference_unpack(state[name], torch.ones(len(state[name])))
    through_kernel = layer.kernel(torch.eye(layer.in_features, dtype=torch.bfloat16)).T.float()  # W itself
    torch.testing.assert_close(through_kernel, values * scale_bf16[:, None], rtol=2**-8, atol=0)  # bf16 output
    ids = four.tokenizer.build_prompt("你好", [])
    assert four.model(torch.tensor([ids])).logits.isfinite().all()


def test_an_unpaired_weight_is_a_clear_error(tmp_path, int4_checkpoint):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(int4_checkpoint, folder, ignore=shutil.ignore_patterns("converted*"))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight_scale"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(convert.ConversionError, match="dense_h_to_4h.weight"):
        convert.ensure_converted(folder)


def test_auto_profile_runs_a_4bit_checkpoint_at_4_bits_on_the_cpu_and_as_usual_on_a_gpu(int4_checkpoint):
    settings = Settings(model_dir=int4_checkpoint)
    cpu = plan_for(settings, Hardware(cuda=False, ram_bytes=64 << 30))
    assert cpu.bits == 4 and "4-bit weights" in cpu.reason
    assert plan_for(Settings(model_dir=int4_checkpoint.parent), Hardware(cuda=False, ram_bytes=64 << 30)).bits > 4
    for free_gib, bits in ((20, 16), (11, 8), (6, 4)):  # float16 is the reference's own CUDA unpacking
        plan = plan_for(settings, Hardware(cuda=True, free_bytes=free_gib << 30, bf16=True, name="GPU"))
        assert plan.bits == bits


def test_the_int4_model_by_name_downloads_checks_the_disk_and_answers(int4_checkpoint, tmp_path, monkeypatch):
    import shutil

    from server.model import disk
    from server.setup import bootstrap
    from server.setup.bootstrap import DownloadError
    from server.startup import load_for
    from tests.fake_hub import FakeHub

    hub = FakeHub(int4_checkpoint, repo="THUDM/chatglm2-6b-int4")
    try:
        settings = Settings.from_changes({"model": "chatglm2-6b-int4", "mirror": hub.url, "quantize": 16,
                                          "dtype": "float32", "max_context": 256}).replace(
            model_dir=tmp_path / "THUDM" / "chatglm2-6b-int4")
        weights = len(hub.files["pytorch_model.bin"])
        # room for the download, not for the float16 copy it converts into (3.2x the packed download)
        room = int(weights * 2.5)
        monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, room))
        with pytest.raises(DownloadError, match="Not enough disk space"):
            bootstrap.ensure_model(settings)
        monkeypatch.undo()
        loaded = load_for(settings)
    finally:
        hub.close()
    assert loaded.plan.precision == "float32" and loaded.tokenizer.family == "chatglm2"
    assert (settings.model_dir / "pytorch_model.bin").read_bytes() == hub.files["pytorch_model.bin"]
    assert (settings.model_dir / "converted-float32" / "config.json").is_file()

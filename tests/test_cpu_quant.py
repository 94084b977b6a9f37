"""torch's CPU int4/int8 kernels: quantization, the packed layout, the pre-quantized cache, and the model on it."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.model import convert, cpu_kernels, cpu_quant, int8_gemm
from server.model.cpu_quant import dequantize_int4, int4_block_rows, quantize_int4, quantize_int8
from server.model.loader import load_model
from tests.conftest import cpu_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def weight():
    return torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.05


def test_int4_round_trip_is_within_half_a_step(weight):
    packed, scales_zeros = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 64)
    assert scales_zeros.shape == (128 // cpu_quant.GROUP, 256, 2)
    groups = weight.reshape(256, -1, cpu_quant.GROUP)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(cpu_quant.GROUP, dim=1)
    error = (dequantize_int4(packed, scales_zeros).float() - weight).abs()
    assert (error <= step / 2 + 2e-3).all()  # + bfloat16 rounding of scale, zero and result


def test_the_packed_layout_is_read_from_the_packer_itself():
    order = int4_block_rows()
    assert order is not None, "torch packs 64-row blocks with AVX512 and 32-row blocks with AVX2"
    block = 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32
    assert sorted(order.tolist()) == list(range(block))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_expanding_into_scratch_memory_gives_the_same_weights_and_keeps_the_memory(weight, dtype):
    packed, scales_zeros = quantize_int4(weight)
    q, scales = quantize_int8(weight)
    for expand in (lambda **kw: dequantize_int4(packed, scales_zeros, dtype, **kw),
                   lambda **kw: cpu_quant.dequantize_int8(q, scales, dtype, **kw)):
        fresh = expand()
        first = expand(reuse=True)
        assert first.dtype == dtype and torch.equal(first, fresh)
        address = first.data_ptr()
        assert torch.equal(expand(reuse=True), fresh) and expand(reuse=True).data_ptr() == address
    # the expansion agrees with the kernel itself (the identity through torch's int4 matmul), to a bfloat16 step of
    # the largest weight (the kernel rounds (q - 8) * scale before adding the zero)
    eye = torch.eye(128, dtype=torch.bfloat16)
    exact = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, cpu_quant.GROUP, scales_zeros).t().float()
    assert (dequantize_int4(packed, scales_zeros, dtype).float() - exact).abs().max() <= 2**-7 * exact.abs().max()


def test_each_thread_expands_into_its_own_scratch_memory(weight):
    """Two engines' workers expanding at once must not write into one buffer."""
    from concurrent.futures import ThreadPoolExecutor

    packed, scales_zeros = quantize_int4(weight)
    mine = dequantize_int4(packed, scales_zeros, reuse=True).data_ptr()
    with ThreadPoolExecutor(1) as other:
        theirs = other.submit(lambda: dequantize_int4(packed, scales_zeros, reuse=True).data_ptr()).result()
    assert mine != theirs and dequantize_int4(packed, scales_zeros, reuse=True).data_ptr() == mine


def test_the_engine_gives_its_expansion_memory_back_when_idle(tiny_checkpoint, engine_for, monkeypatch):
    """A prompt that expands the weights takes scratch memory in the worker; once nothing runs, it goes back."""
    import time

    from server.engine.budget import GenerationRequest

    loaded = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="torch"))
    layers = [m for m in loaded.model.modules() if isinstance(m, cpu_quant.Int4Linear)]
    for layer in layers:
        layer.dense_from_tokens = 8  # (the tiny model's prompts expand)
    held_at_release = []
    release = cpu_quant.release_scratch
    monkeypatch.setattr(cpu_quant, "release_scratch",
                        lambda: (held_at_release.append(cpu_quant.scratch_bytes()), release()))
    before = cpu_quant.scratch_bytes()
    engine = engine_for(loaded, prompt_cache_mb=0)
    done = engine.submit(GenerationRequest(query="hello world 你好 " * 8, max_new_tokens=2, temperature=0)).wait()
    assert done.prompt_tokens >= 8
    deadline = time.monotonic() + 10
    while cpu_quant.scratch_bytes() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cpu_quant.scratch_bytes() == before
    biggest = max(layer.in_features * layer.out_features for layer in layers)  # weights of the largest matrix
    assert max(held_at_release) - before >= biggest * 2  # (its bfloat16 expansion was held until then)


@pytest.mark.parametrize("tokens", [1, 5, max(cpu_quant.DENSE_FROM_TOKENS.values()) + 3])  # kernels; dense
def test_layers_compute_what_their_dequantized_weights_say(weight, tokens):
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(1))
    for kind, tensors, dense in [
        (cpu_quant.Int4Linear, quantize_int4(weight), lambda t: dequantize_int4(*t).float()),
        (cpu_quant.Int8Linear, quantize_int8(weight), lambda t: t[0].float() * t[1].float()[:, None]),
    ]:
        layer = kind(128, 256, bias=True)
        bias = torch.randn(256).to(torch.bfloat16)
        names = ["weight_int4", "scales_zeros"] if kind is cpu_quant.Int4Linear else ["weight_int8", "scales"]
        layer.load_state_dict({**dict(zip(names, tensors)), "bias": bias}, assign=True)
        expected = x @ dense(tensors).T + bias.float()
        got = layer(x[None]).float()[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 0.02 * expected.abs().max(), kind.__name__


GEMMS = [pytest.param(kernel, marks=pytest.mark.skipif(
    not int8_gemm.activation_bits(kernel), reason=f"{kernel}'s int8 GEMM is not exact on this CPU, so the server "
    "never uses it here (test_the_exactness_probe_tells_where_each_int8_gemm_is_usable checks both)"))
    for kernel in int8_gemm.KERNELS]


def packed_int8_layer(weight: torch.Tensor, kernel: str, bias: torch.Tensor | None = None) -> cpu_quant.Int8Linear:
    layer = cpu_quant.Int8Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    q, scale = quantize_int8(weight)
    layer.load_state_dict({"weight_int8": q, "scales": scale, **({"bias": bias} if bias is not None else {})},
                          assign=True)
    layer.pack(kernel)  # (the loader does so only where it is the faster kernel)
    assert layer.weight_int8 is None and "weight_int8" not in layer.state_dict()  # released: the GEMM has its copy
    return layer


@pytest.mark.parametrize("bits, top", [(8, 127), (7, 63)])
def test_the_two_pass_activation_quantization_keeps_14_to_16_bits(bits, top):
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(2))
    x[1, 7] = 300.0  # an outlier channel
    q, s1, s2 = int8_gemm.int8_activations(x.clone(), bits)
    assert q.shape == (6, 4096) and torch.equal(q, q.round()) and q.abs().max() <= top
    back = q[:3] * s1 + q[3:] * s2
    assert ((back - x).abs() <= s1 / (4 * top) + 1e-6).all()
    assert (back - x).abs()[1].max() < 300 / top / (4 * top) * 1.01  # the outlier's row too


def gemm_error(weight: torch.Tensor, kernel: str) -> float:
    """Largest error of an int8 GEMM layer against exact int8 math, relative to the largest output."""
    layer = packed_int8_layer(weight, kernel)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    q, scale = quantize_int8(weight)
    expected = x.float() @ (q.float() * scale.float()[:, None]).T
    return float((layer(x).float() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("kernel", int8_gemm.KERNELS)
def test_the_exactness_probe_tells_where_each_int8_gemm_is_usable(weight, kernel, monkeypatch):
    """Without VNNI 8-bit activations saturate int16 pair sums: the probe must say so, and then 7 bits are used
    (exact), or nothing uses the kernel."""
    bits = int8_gemm.activation_bits(kernel)
    if bits is None:
        assert f"int8-{kernel}" not in cpu_kernels.measure().decode_ms
        return
    assert gemm_error(weight * 20, kernel) < 0.01  # large activations x weights make pairs overflow int16
    if bits == 7:  # what 8 bits would have done here
        monkeypatch.setattr(int8_gemm, "activation_bits", lambda k: 8)
        assert gemm_error(weight * 20, kernel) > 0.02


def test_without_vnni_fbgemm_falls_back_to_exact_7_bit_activations():
    """FBGEMM capped at plain AVX2 (how an older PC runs it): 8-bit activations saturate, 7-bit ones are exact,
    and a layer on them still computes what its weights say."""
    code = (
        "import torch\n"
        "from server.model import cpu_quant, int8_gemm\n"
        "from server.model.cpu_quant import quantize_int8\n"
        "assert int8_gemm.activation_bits('fbgemm') == 7, int8_gemm.activation_bits('fbgemm')\n"
        "w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))\n"
        "layer = cpu_quant.Int8Linear(128, 256, bias=False)\n"
        "q, scale = quantize_int8(w)\n"
        "layer.load_state_dict({'weight_int8': q, 'scales': scale}, assign=True)\n"
        "layer.pack('fbgemm')\n"
        "x = torch.randn(9, 128, generator=torch.Generator().manual_seed(1)) * 20\n"
        "x[:, 3] *= 50\n"
        "expected = x @ (q.float() * scale.float()[:, None]).T\n"
        "error = float((layer(x).float() - expected).abs().max() / expected.abs().max())\n"
        "assert error < 0.01, error\n"
        "print('ok', error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("kernel", GEMMS)
@pytest.mark.parametrize("tokens", [1, 5, 140, int8_gemm.ROWS + 77])  # decode, batch, prompts in pieces
def test_int8_gemm_layer_computes_what_its_dequantized_weights_say(weight, kernel, tokens):
    bias = torch.randn(256).to(torch.bfloat16)
    layer = packed_int8_layer(weight, kernel, bias)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(1))
    x[:, 3] *= 50  # an outlier channel: one int8 scale per row would lose ~10 % here
    q, scale = quantize_int8(weight)
    expected = x @ (q.float() * scale.float()[:, None]).T + bias.float()
    got = layer(x[None]).float()[0]
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()  # bfloat16 output: ~0.4 %
    one_scale = torch.round(x / (x.abs().amax(-1, keepdim=True) / 127)) * (x.abs().amax(-1, keepdim=True) / 127)
    assert (one_scale @ (q.float() * scale.float()[:, None]).T + bias.float() - expected).abs().max() > \
        3 * (got - expected).abs().max()  # what the second pass is for


@pytest.mark.parametrize("kernel", GEMMS)
def test_int8_gemm_rows_do_not_depend_on_their_batch(weight, kernel):
    layer = packed_int8_layer(weight, kernel)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    together = layer(x)
    assert all(torch.equal(layer(x[i:i + 1])[0], together[i]) for i in range(7))  # int32 sums are exact


def test_int8_round_trip_is_within_half_a_step(weight):
    q, scale = quantize_int8(weight)
    error = (q.float() * scale.float()[:, None] - weight).abs()
    assert (error <= scale.float()[:, None] / 2 + 1e-3).all()


@pytest.fixture(scope="module")
def int4_model(tiny_checkpoint):  # on torch's int4 kernel (test_int4_vnni.py: the VNNI one)
    return load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="torch",
                                                           int4_kernel="torch"))


def test_cpu_backends_by_measurement_and_torch_computes_in_bfloat16():
    assert cpu_plan(bits=4, dtype="bfloat16").backend == "torch"  # beat NF4 on every full-size figure
    plan = cpu_plan(bits=8, dtype="bfloat16")
    assert plan.backend == "torch" and plan.dtype == "bfloat16"
    assert dataclasses.replace(plan, backend="torch", dtype="float32").dtype == "bfloat16"
    assert cpu_plan(bits=16).backend == "dense"
    assert cpu_plan(bits=8, dtype="float32").backend == "bnb"  # float32 compute asked for: bitsandbytes has it
    assert dataclasses.replace(plan, device="cuda", backend="").backend == "bnb"


def test_the_cache_holds_the_kernels_layout_aligned_and_a_later_load_only_maps_it(tiny_checkpoint, int4_model,
                                                                                   monkeypatch):
    from safetensors import safe_open

    cache = convert.cache_dir(tiny_checkpoint, "cpu-int4")
    names = set()
    for shard in cache.glob("model-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names |= set(f.keys())
            assert all(f.get_tensor(n).data_ptr() % convert.ALIGN == 0 for n in f.keys())
    assert "model.layers.0.mlp.gate_up_proj.weight_int4" in names
    assert "lm_head.weight_int8" in names  # the output layer keeps 8 bits
    assert "model.embed_tokens.weight" in names  # bfloat16
    assert type(int4_model.model.lm_head).__name__ == "Int8Linear"
    monkeypatch.setattr(cpu_quant, "quantize_int4", lambda *a: pytest.fail("a later start must not quantize"))
    before = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="torch",
                                                            int4_kernel="torch"))
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert again.model.model.layers[0].self_attn.q_proj.weight_int4.data_ptr() % 64 == 0


@pytest.mark.parametrize("kernel", GEMMS)
def test_an_int8_model_holds_the_gemms_copies_and_no_mapped_file(tiny_checkpoint, kernel):
    loaded = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=8, dtype="bfloat16"),
                                                             int8_kernel=kernel))
    layers = [m for m in loaded.model.modules() if isinstance(m, cpu_quant.Int8Linear)]
    assert layers and all(m.packed is not None and m.weight_int8 is None for m in layers)
    assert {m.packed.kernel for m in layers} == {kernel}
    assert loaded.model.mapped_files == []  # every shard was packed or copied, then unmapped
    assert loaded.cpu_kernels["int8"] == kernel
    torch_kernel = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=8, dtype="bfloat16"),
                                                                   int8_kernel="torch"))
    ids = torch.tensor([loaded.tokenizer.build_prompt("hello world 你好", [])])
    with torch.no_grad():
        a, b = loaded.model(ids).logits[0, -1].float(), torch_kernel.model(ids).logits[0, -1].float()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999  # the same weights, activations in 16 vs ~16 bits


def test_torchs_int8_kernel_reads_the_mapped_weights(tiny_checkpoint, int4_model):
    loaded = load_model(tiny_checkpoint, dataclasses.replace(cpu_plan(bits=8, dtype="bfloat16"),
                                                             int8_kernel="torch"))
    layers = [m for m in loaded.model.modules() if isinstance(m, cpu_quant.Int8Linear)]
    assert layers and all(m.packed is None and m.weight_int8 is not None for m in layers)
    assert loaded.model.mapped_files and loaded.cpu_kernels["int8"] == "torch"
    assert int4_model.model.mapped_files  # int4 weights are used where they lie in the file


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_stay_close_to_bfloat16(tiny_checkpoint, tiny_model, bits, int4_model):
    loaded = int4_model if bits == 4 else load_model(tiny_checkpoint, cpu_plan(bits=8, dtype="bfloat16"))
    for length in (6, 140):  # the kernels' path and the prefill path
        ids = torch.tensor([(loaded.tokenizer.build_prompt("hello world 你好 " * 40, []))[:length]])
        with torch.no_grad():
            quant, exact = loaded.model(ids).logits[0, -1].float(), tiny_model.model(ids).logits[0, -1]
        assert torch.corrcoef(torch.stack([quant, exact]))[0, 1] > (0.99 if bits == 8 else 0.97)


def test_conversion_reports_progress_up_to_one(tmp_path):
    from tests.checkpoint_factory import write_checkpoint

    folder = write_checkpoint(tmp_path / "m", shards=3)
    seen = []
    convert.ensure_converted(folder, "cpu-int8", progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 3


def test_a_killed_conversion_leaves_no_temporary_folder_behind(tmp_path):
    from tests.checkpoint_factory import write_checkpoint

    folder = write_checkpoint(tmp_path / "m")
    stale = folder / ".converted-cpu-int4.tmp-999999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    convert.ensure_converted(folder, "cpu-int4")
    assert not stale.exists() and convert.is_current(folder, "cpu-int4")


def test_bitsandbytes_4bit_on_the_cpu_loads_a_pre_quantized_cache_equal_to_quantizing_on_the_fly(
        tiny_checkpoint, monkeypatch):
    import bitsandbytes.functional

    from server.model.loader import cache_format, load_pretrained

    plan = dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="bnb")
    assert cache_format(plan) == "cpu-nf4"
    cached = load_model(tiny_checkpoint, plan)
    assert type(cached.model.model.layers[0].mlp.gate_up_proj).__name__ == "Linear4bit"
    assert type(cached.model.lm_head).__name__ == "Linear"  # as transformers does: the output layer stays 16-bit
    on_the_fly = load_pretrained(convert.ensure_converted(tiny_checkpoint), plan)
    ids = torch.tensor([cached.tokenizer.build_prompt("hello world 你好", [])])
    with torch.no_grad():
        assert torch.equal(cached.model(ids).logits, on_the_fly(ids).logits)
    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", lambda *a, **k: pytest.fail("quantized again"))
    load_model(tiny_checkpoint, plan)  # a later start reads the cache as it is


def test_fbgemm_is_not_asked_for_where_torch_does_not_list_it(monkeypatch):
    """Where torch's quantized engines lack FBGEMM (the Windows wheel under wine), setting the engine throws a
    C++ exception through torch, after which wine crashed the process: the probe must not ask at all."""
    packs = []
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["onednn"])
    monkeypatch.setitem(int8_gemm.PACK, "fbgemm", lambda *args: packs.append(args))
    int8_gemm.activation_bits.cache_clear()
    try:
        assert int8_gemm.activation_bits("fbgemm") is None and packs == []
        assert "fbgemm" not in int8_gemm.usable()
    finally:
        int8_gemm.activation_bits.cache_clear()

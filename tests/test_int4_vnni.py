"""The 4-bit VNNI kernel (server/model/int4_vnni.py): its sums, its expansion, its place in a loaded model."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from server.model import cpu_kernels, cpu_quant, int4_vnni
from server.model.loader import ModelLoadError, load_model
from tests.conftest import cpu_plan

ROOT = Path(__file__).resolve().parent.parent
vnni_here = pytest.mark.skipif(not int4_vnni.available(), reason="this CPU has no VNNI (AVX512-VNNI or AVX-VNNI)")
FORMS = [form for form in ("avx512", "avx2") if int4_vnni.available()
         and (form == "avx2" or int4_vnni.isa() == "avx512")]


def test_numba_is_installed_where_the_kernel_can_run():
    import numba  # noqa: F401  (requirements.txt: on x86-64; the kernel must not go missing quietly)


@pytest.mark.parametrize("features, environ, form", [
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True, "avxvnni": True}, {}, "avx512"),  # Sapphire Rapids
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True}, {}, "avx512"),  # Zen 4, Ice Lake
    ({"avxvnni": True}, {}, "avx2"),  # Core 12th gen and later
    ({"avx2": True}, {}, None),  # plain AVX2: torch's kernel
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True}, {"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True}, {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}, "avx2"),
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True}, {"ONEDNN_MAX_CPU_ISA": "avx2"}, None),
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, None),
    ({"avx512vnni": True, "avx512bw": True, "avx512vl": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "avx512"),
])
def test_the_form_follows_the_cpu_and_the_emulating_caps(features, environ, form):
    assert int4_vnni.vnni_isa(features, environ) == form


def quantized(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different ranges
    return weight, *cpu_quant.quantize_int4(weight)


def quantized_activations(x: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's own quantization of x: (int8 [M, K], step per group of 32, sum of each group)."""
    m, k = x.shape
    q, dx, sums = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // 32), torch.empty(m, k // 32)
    int4_vnni.kernels(form).quantize(x.float().numpy(), q.numpy(), dx.numpy(), sums.numpy())
    return q, dx, sums


def test_activations_are_quantized_in_steps_of_their_groups_largest_value():
    if not int4_vnni.available():
        pytest.skip("this CPU has no VNNI")
    x = torch.randn(3, 96) * torch.tensor([1.0, 100.0, 0.01]).repeat_interleave(32)  # groups of other ranges
    x[2, 64:] = 0  # an all-zero group
    q, dx, sums = quantized_activations(x, int4_vnni.isa())
    groups = x.view(3, 3, 32)
    assert torch.allclose(dx, groups.abs().amax(-1).clamp(min=1e-30) / 127)
    top = q.view(3, 3, 32).abs().amax(-1)
    assert (top[:2] == 127).all() and (top[2, :2] == 127).all() and top[2, 2] == 0  # the zero group stays 0
    assert (q.float().view(3, 3, 32) * dx[..., None] - groups).abs().le(dx[..., None] / 2 * 1.0001).all()
    assert torch.allclose(sums, groups.sum(-1), atol=1e-4)


def exact_product(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, form: str) -> torch.Tensor:
    """What the kernel computes, in float64: per group, scale * (dx * sum(q x_q) - 8 sum(x)) + zero * sum(x)."""
    q_x, dx, sums = quantized_activations(x, form)
    k = x.shape[1]
    eye = cpu_quant.dequantize_int4(packed, scales_zeros, torch.float32)  # w = (q - 8) * scale + zero
    scale, zero = (scales_zeros[..., i].double() for i in (0, 1))  # [K/G, N]
    q = ((eye.double().t().reshape(k // 32, 32, -1) - (zero - 8 * scale)[:, None]) / scale[:, None]).round()
    dots = torch.einsum("mgk,gkn->mgn", q_x.double().view(x.shape[0], k // 32, 32), q)
    return (scale * (dx.double()[..., None] * dots - 8 * sums.double()[..., None])
            + zero * sums.double()[..., None]).sum(1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n, k, rows", [(64, 64, 1), (128, 96, 3), (4608, 4096, 1), (256, 13696, 5)])
def test_the_kernel_sums_what_the_quantized_activations_and_weights_give(form, n, k, rows):
    _, packed, scales_zeros = quantized(n, k)
    x = torch.randn(rows, k).to(torch.bfloat16)
    got = int4_vnni.PackedInt4(packed, scales_zeros, form)(x)
    want = exact_product(x, packed, scales_zeros, form)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert torch.allclose(got.double(), want, rtol=2 ** -7, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("form", FORMS)
def test_it_is_as_close_to_the_float_weights_as_torchs_int4_kernel(form):
    weight, packed, scales_zeros = quantized(4096, 4096)
    x = torch.randn(4, 4096).to(torch.bfloat16)
    exact = x.float() @ weight.t()
    errors = {}
    for name, y in (("vnni", int4_vnni.PackedInt4(packed, scales_zeros, form)(x)),
                    ("torch", torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros))):
        errors[name] = ((y.float() - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()
    # the weights' 4 bits dominate; the activations' 8 bits per group add ~1 % to that error, not more than 5 %
    assert errors["vnni"] < 1.05 * errors["torch"], errors


@pytest.mark.parametrize("form", FORMS)
def test_rows_of_a_batch_come_out_as_each_row_alone(form):
    _, packed, scales_zeros = quantized(512, 1024)
    layer = int4_vnni.PackedInt4(packed, scales_zeros, form)
    x = torch.randn(6, 1024).to(torch.bfloat16)
    assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x]))


@vnni_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_expansion_gives_the_weights_of_torchs_layout(dtype):
    _, packed, scales_zeros = quantized(1024, 4096)
    layer = int4_vnni.PackedInt4(packed, scales_zeros)
    want = cpu_quant.dequantize_int4(packed, scales_zeros, torch.float32).to(dtype)
    assert torch.equal(layer.dense(dtype), want)
    assert torch.equal(layer.dense(dtype, reuse=True), want)  # in the thread's scratch memory, the same


def test_the_256_bit_form_compiles_for_a_cpu_without_avx512(tmp_path):
    """NUMBA_CPU_NAME=alderlake makes numba compile for a Core 12th gen (AVX-VNNI, no AVX512): the 256-bit form
    must not need an AVX512 instruction (this CPU runs the code, which is all it checks)."""
    if not int4_vnni.available():
        pytest.skip("this CPU has no VNNI to run the code with")
    script = (
        "import torch\n"
        "from server.model import cpu_quant, int4_vnni\n"
        "w = torch.randn(128, 256)\n"
        "packed, sz = cpu_quant.quantize_int4(w)\n"
        "x = torch.randn(2, 256).to(torch.bfloat16)\n"
        "y = int4_vnni.PackedInt4(packed, sz, 'avx2')(x)\n"
        "ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)\n"
        "print(float(((y.float() - ref.float()).norm() / ref.float().norm())))\n"
    )
    env = dict(os.environ, NUMBA_CPU_NAME="alderlake", NUMBA_CPU_FEATURES="")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) < 0.05


def vnni_plan(**changes):
    return dataclasses.replace(cpu_plan(bits=4, dtype="bfloat16"), backend="torch", **changes)


@vnni_here
def test_a_model_on_the_vnni_kernel_holds_its_layout_only_and_answers_as_torchs_kernel(tiny_checkpoint, tiny_model):
    vnni = load_model(tiny_checkpoint, vnni_plan(int4_kernel="vnni"))
    layers = [m for m in vnni.model.modules() if isinstance(m, cpu_quant.Int4Linear)]
    assert layers and all(m.packed is not None and m.weight_int4 is None for m in layers)
    assert vnni.cpu_kernels["int4"] == "vnni"
    assert vnni.model.mapped_files == []  # repacked or copied: the cache file is not held
    on_torch = load_model(tiny_checkpoint, vnni_plan(int4_kernel="torch"))
    ids = torch.tensor([vnni.tokenizer.build_prompt("hello world 你好 " * 3, [])[:12]])  # on the kernels
    with torch.no_grad():
        logits = [m.model(ids).logits[0, -1].float() for m in (vnni, on_torch, tiny_model)]
    assert torch.corrcoef(torch.stack([logits[0], logits[1]]))[0, 1] > 0.995
    assert torch.corrcoef(torch.stack([logits[0], logits[2]]))[0, 1] > 0.99


@vnni_here
def test_long_prompts_expand_the_vnni_layout_and_compute_the_same(tiny_checkpoint, monkeypatch):
    loaded = load_model(tiny_checkpoint, vnni_plan(int4_kernel="vnni"))
    layers = [m for m in loaded.model.modules() if isinstance(m, cpu_quant.Int4Linear)]
    ids = torch.tensor([loaded.tokenizer.build_prompt("hello world 你好 " * 10, [])[:40]])
    with torch.no_grad():
        for layer in layers:
            layer.dense_from_tokens = sys.maxsize  # every row on the kernel
        on_kernel = loaded.model(ids).logits[0, -1].float()
        for layer in layers:
            layer.dense_from_tokens = 5  # the prompt's rows on W expanded from the VNNI layout
        expanded = loaded.model(ids).logits[0, -1].float()
    assert torch.corrcoef(torch.stack([on_kernel, expanded]))[0, 1] > 0.995


@vnni_here
def test_auto_takes_the_int4_kernel_the_measurement_picked_and_health_names_it(tiny_checkpoint, engine_for, serve):
    choice = cpu_kernels.measure()
    assert "int4-vnni" in choice.decode_ms and "int4-vnni" in choice.prefill_ms
    close = [k for k, key in cpu_kernels.INT4_KEYS.items()
             if choice.decode_ms[key] <= cpu_kernels.DECODE_MARGIN * min(choice.decode_ms[v]
                                                                         for v in cpu_kernels.INT4_KEYS.values())]
    assert choice.int4 == min(close, key=lambda k: choice.prefill_ms[cpu_kernels.INT4_KEYS[k]])
    assert choice.decode_ms_at(4) == choice.decode_ms[cpu_kernels.INT4_KEYS[choice.int4]]
    loaded = load_model(tiny_checkpoint, vnni_plan())
    assert {m.packed is not None for m in loaded.model.modules()
            if isinstance(m, cpu_quant.Int4Linear)} == {choice.int4 == "vnni"}
    health = requests.get(serve(engine_for(loaded)).url + "/health", timeout=10).json()
    assert health["cpu_kernels"]["int4"] == choice.int4 == health["cpu_kernels"]["measured"]["int4"]


def test_forcing_the_vnni_kernel_where_it_cannot_run_is_refused_clearly(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # as a CPU without VNNI
    int4_vnni.isa.cache_clear()
    try:
        assert not int4_vnni.available()
        with pytest.raises(ModelLoadError, match="--cpu-kernels vnni: the 4-bit VNNI kernel does not run here"):
            load_model(tiny_checkpoint, vnni_plan(int4_kernel="vnni"))
    finally:
        monkeypatch.undo()
        int4_vnni.isa.cache_clear()


@vnni_here
def test_the_disk_prompt_cache_of_one_int4_kernel_is_not_read_by_the_other(tiny_checkpoint, tmp_path, engine_for):
    """Their sums differ in the last bits (8-bit activations), so a stored prefix's keys and values are the kernel's
    own: a load on the other kernel keeps its disk cache under another fingerprint (and the earlier entries go),
    a load on the same kernel finds the earlier folder and its entries."""
    import shutil

    from server.engine.budget import GenerationRequest

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns(cpu_kernels.KERNEL_RECORD, "prompt-cache"))
    engine = engine_for(load_model(folder, vnni_plan(int4_kernel="torch")), prompt_cache_disk_mb=64)
    engine.submit(GenerationRequest(query="你好 hello", max_new_tokens=4, temperature=0)).wait(60)
    engine.prefix_cache.disk.flush()
    on_torch = engine.prefix_cache.disk.folder
    stored = {entry.path.name for entry in engine.prefix_cache.disk.entries.values()}
    engine.close()
    assert stored
    again = engine_for(load_model(folder, vnni_plan(int4_kernel="torch")), prompt_cache_disk_mb=64)
    assert again.prefix_cache.disk.folder == on_torch
    assert stored <= {entry.path.name for entry in again.prefix_cache.disk.entries.values()}
    again.close()
    on_vnni = engine_for(load_model(folder, vnni_plan(int4_kernel="vnni")), prompt_cache_disk_mb=64)
    assert on_vnni.prefix_cache.disk.folder != on_torch and not on_torch.exists()
    assert not stored & {entry.path.name for entry in on_vnni.prefix_cache.disk.entries.values()}

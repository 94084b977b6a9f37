"""The CPU kernels are chosen by measuring them here (server/model/cpu_kernels.py), and a load can force each."""

import dataclasses
import json
import shutil
import sys

import pytest
import requests
import torch

from server.model import cpu_kernels, cpu_quant, int4_vnni, int8_gemm
from server.model.cpu_kernels import NEVER, KernelChoice, dense_threshold
from server.model.loader import ModelLoadError, load_model
from tests.conftest import cpu_plan


@pytest.mark.parametrize("kernel_ms, dense_ms, expand_ms, rows", [  # kernel: 32 rows; dense: 128 rows
    (64.0, 752.0, 80.0, NEVER),  # plain AVX2 in bfloat16: a kernel row is cheaper, never expand
    (64.0, 256.0, 80.0, NEVER),  # the same cost per row
    (64.0, 128.0, 80.0, 80),  # float32 there: 1 ms saved a row, 80 ms to expand -> from 80 rows
    (320.0, 128.0, 90.0, 10),  # AMX-like: 9 ms saved a row, 90 ms to expand -> from 10 rows
    (320.0, 0.0, 1.0, 2),  # at least two rows: one token is a decode step
])
def test_prompts_expand_the_weights_only_from_where_it_pays(kernel_ms, dense_ms, expand_ms, rows):
    assert dense_threshold(kernel_ms, dense_ms, expand_ms) == rows


def test_the_measurement_on_this_cpu_is_complete_and_consistent():
    choice = cpu_kernels.measure()
    assert choice is cpu_kernels.measure()  # once per process
    assert {"int8-torch", "bfloat16"} <= set(choice.decode_ms) and all(v > 0 for v in choice.decode_ms.values())
    for kernel in int8_gemm.KERNELS:
        assert (f"int8-{kernel}" in choice.decode_ms) == bool(int8_gemm.activation_bits(kernel))
    int8 = {k.removeprefix("int8-"): v for k, v in choice.decode_ms.items() if k.startswith("int8-")}
    close = [k for k, ms in int8.items() if ms <= cpu_kernels.DECODE_MARGIN * min(int8.values())]
    assert choice.int8 == min(close, key=lambda k: choice.prefill_ms[f"int8-{k}"])
    dense_row = choice.prefill_ms[choice.dense_dtype] / cpu_kernels.DENSE_ROWS
    assert ("int4-vnni" in choice.decode_ms) == int4_vnni.available()
    for bits, kernel in ((8, "int8-torch"), (4, cpu_kernels.INT4_KEYS[choice.int4])):
        cheaper = choice.prefill_ms.get(kernel, 0) / cpu_kernels.PREFILL_ROWS <= dense_row
        if cheaper or (bits == 8 and choice.int8 != "torch"):
            assert choice.dense_from_tokens[bits] == NEVER
    assert choice.decode_ms_at(8) == choice.decode_ms[f"int8-{choice.int8}"]
    faster = "float32" if choice.prefill_ms["float32"] < choice.prefill_ms["bfloat16"] else "bfloat16"
    assert choice.dense_dtype == faster
    shown = choice.as_dict()
    assert shown["int8"] == choice.int8 and shown["int4"] == choice.int4
    assert set(shown["dense_from_tokens"]) == {"8", "4"}


def plan(bits: int, **changes):
    return dataclasses.replace(cpu_plan(bits=bits, dtype="bfloat16"), **changes)


def fake_choice(int8: str, thresholds: dict[int, int], dense_dtype: str = "bfloat16") -> KernelChoice:
    return KernelChoice(int8=int8, dense_from_tokens=thresholds, dense_dtype=dense_dtype,
                        decode_ms={"int8-torch": 1.0})


def test_the_measured_thresholds_reach_every_layer(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "measure", lambda: fake_choice("torch", {8: 5, 4: 7}))
    int8 = load_model(tiny_checkpoint, plan(8))
    assert {m.dense_from_tokens for m in int8.model.modules() if isinstance(m, cpu_quant.Int8Linear)} == {5}
    assert int8.cpu_kernels["int8"] == "torch" and int8.cpu_kernels["dense_from_tokens"] == {8: 5, 4: 7}
    int4 = load_model(tiny_checkpoint, plan(4))
    rows = {m.dense_from_tokens for m in int4.model.modules() if isinstance(m, cpu_quant.Int4Linear)}
    assert rows == ({7} if cpu_quant.int4_block_rows() is not None else {sys.maxsize})


def test_where_expanding_never_pays_a_long_prompt_runs_on_the_kernel(tiny_checkpoint, tiny_model, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "measure", lambda: fake_choice("torch", {8: NEVER, 4: NEVER}))
    loaded = load_model(tiny_checkpoint, plan(8))
    assert loaded.cpu_kernels["dense_from_tokens"] == {8: None, 4: None}  # shown as never
    for kind in (cpu_quant.Int8Linear, cpu_quant.Int4Linear):
        monkeypatch.setattr(kind, "dense_weight", lambda self: pytest.fail("the weights were expanded"))
    ids = torch.tensor([loaded.tokenizer.build_prompt("hello world 你好 " * 40, [])[:200]])
    with torch.no_grad():
        quant, exact = loaded.model(ids).logits[0, -1].float(), tiny_model.model(ids).logits[0, -1]
    assert torch.corrcoef(torch.stack([quant, exact]))[0, 1] > 0.99


@pytest.mark.parametrize("decode, prefill, chosen", [
    ({"torch": 2.5, "fbgemm": 1.9, "onednn": 2.5}, {"torch": 28, "fbgemm": 10, "onednn": 9}, "fbgemm"),  # Zen 4
    ({"torch": 2.5, "fbgemm": 2.4, "onednn": 2.3}, {"torch": 28, "fbgemm": 10, "onednn": 4}, "onednn"),  # AMX-like
    ({"torch": 2.3, "onednn": 2.5}, {"torch": 28, "onednn": 9}, "onednn"),  # within 10 %: prompts decide
    ({"torch": 2.0, "onednn": 2.5}, {"torch": 28, "onednn": 9}, "torch"),  # 25 % slower at decode: not chosen
])
def test_the_int8_kernel_is_the_fastest_at_prompts_of_those_close_at_decode(decode, prefill, chosen):
    assert cpu_kernels.fastest({f"int8-{k}": v for k, v in decode.items()},
                               {f"int8-{k}": v for k, v in prefill.items()}, [f"int8-{k}" for k in decode]) == f"int8-{chosen}"


@pytest.mark.parametrize("kernel", int8_gemm.KERNELS)
def test_forcing_an_int8_gemm_where_it_is_not_exact_is_refused_clearly(tiny_checkpoint, kernel):
    if int8_gemm.activation_bits(kernel):
        loaded = load_model(tiny_checkpoint, plan(8, int8_kernel=kernel))
        assert all(m.packed is not None for m in loaded.model.modules() if isinstance(m, cpu_quant.Int8Linear))
    else:
        with pytest.raises(ModelLoadError, match="not exact on this CPU"):
            load_model(tiny_checkpoint, plan(8, int8_kernel=kernel))


def test_health_shows_the_kernels_and_their_figures(tiny_checkpoint, engine_for, serve, tmp_path):
    folder = tmp_path / "model"  # (no other test's record of the last start's kernel)
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns(cpu_kernels.KERNEL_RECORD))
    loaded = load_model(folder, plan(8))
    health = requests.get(serve(engine_for(loaded)).url + "/health", timeout=10).json()
    kernels = health["cpu_kernels"]
    assert kernels["int8"] == cpu_kernels.measure().int8
    assert kernels["measured"]["decode_ms"]["int8-torch"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prompts_expand_to_the_measured_dtype_and_compute_the_same(tiny_checkpoint, tiny_model, monkeypatch, dtype):
    monkeypatch.setattr(cpu_kernels, "measure", lambda: fake_choice("torch", {8: 5, 4: 5}, dense_dtype=dtype))
    for bits, kind in ((8, cpu_quant.Int8Linear), (4, cpu_quant.Int4Linear)):
        loaded = load_model(tiny_checkpoint, plan(bits))
        layers = [m for m in loaded.model.modules() if isinstance(m, kind) and m.dense_from_tokens == 5]
        assert layers and {m.dense_dtype for m in layers} == {getattr(torch, dtype)}
        ids = torch.tensor([loaded.tokenizer.build_prompt("hello world 你好 " * 10, [])[:60]])
        with torch.no_grad():
            quant, exact = loaded.model(ids).logits[0, -1].float(), tiny_model.model(ids).logits[0, -1]
        assert torch.corrcoef(torch.stack([quant, exact]))[0, 1] > 0.97


def measured(decode: dict[str, float], prefill: dict[str, float]) -> KernelChoice:
    """A measurement with these int8 figures (ms), the kernel picked as measure() picks it."""
    decode, prefill = ({f"int8-{k}": v for k, v in d.items()} for d in (decode, prefill))
    return KernelChoice(int8=cpu_kernels.fastest(decode, prefill, list(decode)).removeprefix("int8-"),
                        dense_from_tokens={8: NEVER, 4: NEVER},
                        decode_ms=decode, prefill_ms=prefill)


# emulated consumer Intel: FBGEMM decodes 9-12 % faster than oneDNN, oneDNN runs prompts 1.6 x faster
FBGEMM_AHEAD = measured({"torch": 2.6, "fbgemm": 2.00, "onednn": 2.24}, {"torch": 28, "fbgemm": 16, "onednn": 10})
CLOSE = measured({"torch": 2.6, "fbgemm": 2.00, "onednn": 2.18}, {"torch": 28, "fbgemm": 16, "onednn": 10})


def test_two_int8_kernels_near_each_other_stop_trading_places_between_starts(tmp_path):
    assert (FBGEMM_AHEAD.int8, CLOSE.int8) == ("fbgemm", "onednn")  # each start picking afresh: they alternate
    starts = [cpu_kernels.settled_int8(figures, tmp_path) for figures in (FBGEMM_AHEAD, CLOSE, FBGEMM_AHEAD, CLOSE)]
    # the second start's pick is better at prompts by far: taken; then it stays while the figures allow it
    assert starts == ["fbgemm", "onednn", "onednn", "onednn"]
    record = json.loads((tmp_path / cpu_kernels.KERNEL_RECORD).read_text())
    assert record == {"machine": cpu_kernels.machine(), "int8": "onednn"}


@pytest.mark.parametrize("figures, why", [
    (measured({"torch": 2.6, "fbgemm": 2.0, "onednn": 2.5}, {"torch": 28, "fbgemm": 16, "onednn": 10}),
     "25 % slower at decode than the fastest: beyond 1.1 x 1.1"),
    (measured({"torch": 2.6, "fbgemm": 2.0, "onednn": 2.1}, {"torch": 28, "fbgemm": 9, "onednn": 10}),
     "both close at decode, and prompts now faster on the pick by more than 10 %"),
    (measured({"torch": 2.6, "fbgemm": 2.0}, {"torch": 28, "fbgemm": 16}), "no longer usable here"),
])
def test_the_last_starts_kernel_goes_where_the_figures_no_longer_allow_it(tmp_path, figures, why):
    cpu_kernels.settled_int8(CLOSE, tmp_path)  # onednn recorded
    assert cpu_kernels.settled_int8(figures, tmp_path) == figures.int8 != "onednn", why


def test_a_record_of_another_machine_or_a_broken_one_is_not_followed(tmp_path):
    record = tmp_path / cpu_kernels.KERNEL_RECORD
    record.write_text(json.dumps({"machine": {**cpu_kernels.machine(), "cpu": "another CPU"}, "int8": "onednn"}))
    assert cpu_kernels.settled_int8(FBGEMM_AHEAD, tmp_path) == "fbgemm"  # (onednn would be allowed on this one)
    record.write_text("{half a record")
    assert cpu_kernels.settled_int8(FBGEMM_AHEAD, tmp_path) == "fbgemm"
    assert json.loads(record.read_text())["int8"] == "fbgemm"  # rewritten whole
    assert cpu_kernels.settled_int8(FBGEMM_AHEAD, tmp_path / "missing") == "fbgemm"  # unwritable: no record, no error


@pytest.mark.skipif(not int8_gemm.usable(), reason="no int8 GEMM is exact on this CPU: torch's kernel is the only one")
def test_a_load_keeps_the_last_starts_kernel_and_the_disk_cache_with_it(tiny_checkpoint, monkeypatch, tmp_path,
                                                                        engine_for):
    """Two loads of one folder whose measurements pick different kernels, as in two starts on a noisy machine: the
    second keeps the first's kernel (its prompt threshold is its own) and finds the first's disk prompt cache."""
    from server.engine.budget import GenerationRequest

    gemm = int8_gemm.usable()[0]
    first = measured({"torch": 2.0, gemm: 2.1}, {"torch": 9, gemm: 10})  # within 10 %, fewer ms at prompts: torch
    second = measured({"torch": 2.1, gemm: 2.0}, {"torch": 9.5, gemm: 9})  # the GEMM now, by a little
    first = dataclasses.replace(first, dense_from_tokens={8: 5, 4: NEVER}, prefill_ms={
        **first.prefill_ms, "bfloat16": 20.0, "expand-int8": 20.0})
    second = dataclasses.replace(second, prefill_ms={**second.prefill_ms, "bfloat16": 20.0, "expand-int8": 20.0})
    assert (first.int8, second.int8) == ("torch", gemm)
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns(cpu_kernels.KERNEL_RECORD, "prompt-cache"))
    monkeypatch.setattr(cpu_kernels, "measure", lambda: first)
    engine = engine_for(load_model(folder, plan(8)), prompt_cache_disk_mb=64)
    engine.submit(GenerationRequest(query="你好 hello", max_new_tokens=4, temperature=0)).wait(60)
    engine.prefix_cache.disk.flush()
    engine.close()
    monkeypatch.setattr(cpu_kernels, "measure", lambda: second)
    again = load_model(folder, plan(8))
    assert again.cpu_kernels["int8"] == "torch" and again.cpu_kernels["dense_from_tokens"][8] == dense_threshold(
        9.5, 20.0, 20.0) < NEVER
    assert again.cpu_kernels["measured"]["int8"] == gemm  # this start's pick, as /health shows it
    assert all(m.packed is None for m in again.model.modules() if isinstance(m, cpu_quant.Int8Linear))  # torch's
    assert engine_for(again, prompt_cache_disk_mb=64).prefix_cache.usage()["disk"]["entries"] == 1


def test_a_4_bit_or_forced_load_leaves_the_record_alone(tiny_checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns(cpu_kernels.KERNEL_RECORD, "prompt-cache"))
    load_model(folder, plan(4))
    load_model(folder, plan(8, int8_kernel="torch"))
    assert not (folder / cpu_kernels.KERNEL_RECORD).exists()
    load_model(folder, plan(8))
    assert json.loads((folder / cpu_kernels.KERNEL_RECORD).read_text())["int8"] == cpu_kernels.measure().int8

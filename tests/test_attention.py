"""Attention's CPU shortcuts (server/model/attention.py): one decoding row as matmuls gives SDPA's result, a
prompt chunk on the stacked KV heads gives SDPA's result to its rounding, and the model's decode steps and prompt
chunks take them."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from server.model import attention
from server.model.attention import sdpa_attention_forward
from server.model.forward import decode_one_token, prefill


class Layer:  # what the attention functions read from a layer
    num_key_value_groups = 16
    is_causal = True
    training = False


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("keys", [1, 64, 1000])
def test_decode_attention_is_sdpas_result(dtype, tolerance, keys):
    gen = torch.Generator().manual_seed(keys)
    query = torch.randn(2, 32, 1, 128, generator=gen).to(dtype)
    key, value = (torch.randn(2, 2, keys, 128, generator=gen).to(dtype) for _ in range(2))
    got, _ = attention.cpu_attention(Layer(), query, key, value, None, scaling=0.0884)
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=0.0884,
                                              enable_gqa=True).transpose(1, 2)
    assert got.shape == (2, 1, 32, 128) and got.dtype == dtype
    assert (got.float() - expected).abs().max() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, keys", [(4, 40), (16, 16), (16, 2000), (100, 300)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "per head"])
def test_a_chunk_over_a_cache_is_sdpas_result(dtype, rows, keys, mask_kind):
    """The rows of a prompt chunk after `keys - rows` cached tokens, each seeing the keys up to its own position:
    transformers' SDPA path (KV heads repeated per query head) to its rounding. Bit for bit on a Zen 4; on a
    Sapphire Rapids SDPA's kernel rounds by the number of rows it blocks (float32 within 1e-6, bfloat16 one
    unit in the last place in a few values), so the bound is one rounding, far below what a wrong mask moves."""
    gen = torch.Generator().manual_seed(rows * keys)
    query = torch.randn(1, 32, rows, 128, generator=gen).to(dtype)
    key, value = (torch.randn(1, 2, keys, 128, generator=gen).to(dtype) for _ in range(2))
    allowed = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)[None, None]
    mask = {"bool": allowed, "float": torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf")),
            "per head": allowed.expand(1, 32, rows, keys)}[mask_kind]
    got, _ = attention.cpu_attention(Layer(), query, key, value, mask, scaling=0.0884)
    expected, _ = sdpa_attention_forward(Layer(), query, key, value, mask, scaling=0.0884)
    assert got.shape == (1, rows, 32, 128) and got.dtype == dtype
    one_rounding = {torch.float32: dict(atol=4e-6, rtol=4e-6), torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7)}
    torch.testing.assert_close(got, expected, **one_rounding[dtype])
    # the mask matters: without it every row would see every key, far outside that bound
    unmasked, _ = sdpa_attention_forward(Layer(), query, key, value, None, scaling=0.0884, is_causal=False)
    assert not torch.allclose(got, unmasked, **one_rounding[dtype])


def test_whole_prompts_and_masked_batches_still_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or (a[1], None))
    key = value = torch.randn(1, 2, 80, 128)
    attention.cpu_attention(Layer(), torch.randn(1, 32, 5, 128), key, value, None)  # a prompt: causal, no mask
    two = torch.randn(2, 2, 80, 128)
    attention.cpu_attention(Layer(), torch.randn(2, 32, 1, 128), two, two, torch.ones(2, 1, 1, 80).bool())
    attention.cpu_attention(Layer(), torch.randn(2, 32, 3, 128), two, two, torch.ones(2, 1, 3, 80).bool())
    attention.cpu_attention(Layer(), torch.randn(1, 32, 3, 128), key, value, torch.ones(1, 1, 3, 80).bool())
    assert calls == [(1, 32, 5, 128), (2, 32, 1, 128), (2, 32, 3, 128), (1, 32, 3, 128)]
    attention.cpu_attention(Layer(), torch.randn(1, 32, 16, 128), key, value, torch.ones(1, 1, 16, 80).bool())
    attention.cpu_attention(Layer(), torch.randn(1, 32, 1, 128), key, value, None)
    assert len(calls) == 4  # a chunk and a decoding row took the shortcuts


def test_a_decode_step_of_the_model_takes_the_matmuls_and_computes_the_same(tiny_model, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    ids = tok.build_prompt("hello world 你好", [])
    with torch.inference_mode():
        cache, again = DynamicCache(config=model.config), DynamicCache(config=model.config)
        token = int(prefill(model, ids, cache).argmax())
        prefill(model, ids, again)
        sdpa_calls = []
        real_sdpa = attention.sdpa_attention_forward
        monkeypatch.setattr(attention, "sdpa_attention_forward",
                            lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
        fast = decode_one_token(model, token, cache)
        assert sdpa_calls == []  # every layer took the matmuls
        monkeypatch.setattr(attention, "cpu_attention", lambda module, q, k, v, mask, **kw: real_sdpa(
            module, q, k, v, mask, **kw))
        slow = decode_one_token(model, token, again)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_a_prompt_chunk_after_a_cache_takes_the_stacked_heads_and_computes_the_same(tiny_model, monkeypatch):
    """As the engine runs a prompt that joins a decoding batch: its first chunk whole, the next over the cache."""
    model, tok = tiny_model.model, tiny_model.tokenizer
    ids = tok.build_prompt("hello world 你好, a prompt long enough for two chunks of it", [])
    first, rest = ids[:8], ids[8:24]
    real_sdpa = attention.sdpa_attention_forward
    with torch.inference_mode():
        cache, again = DynamicCache(config=model.config), DynamicCache(config=model.config)
        prefill(model, first, cache)
        prefill(model, first, again)
        sdpa_calls = []
        monkeypatch.setattr(attention, "sdpa_attention_forward",
                            lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
        fast = prefill(model, rest, cache)
        assert sdpa_calls == []  # every layer took the stacked heads
        monkeypatch.setattr(attention, "cpu_attention", lambda module, q, k, v, mask, **kw: real_sdpa(
            module, q, k, v, mask, **kw))
        slow = prefill(model, rest, again)
    assert torch.equal(fast, slow)

"""One decoding token's attention on the CPU as matmuls (server/model/attention.py): SDPA's result, and the
model's decode steps take it."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from server.model import attention
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
    got, _ = attention.decode_attention(Layer(), query, key, value, None, scaling=0.0884)
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=0.0884,
                                              enable_gqa=True).transpose(1, 2)
    assert got.shape == (2, 1, 32, 128) and got.dtype == dtype
    assert (got.float() - expected).abs().max() < tolerance


def test_prompts_and_masked_rows_still_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or (a[1], None))
    key = value = torch.randn(1, 2, 8, 128)
    attention.decode_attention(Layer(), torch.randn(1, 32, 5, 128), key, value, None)  # a prompt
    attention.decode_attention(Layer(), torch.randn(1, 32, 1, 128), key, value, torch.ones(1, 1, 1, 8).bool())
    assert calls == [(1, 32, 5, 128), (1, 32, 1, 128)]


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
        monkeypatch.setattr(attention, "decode_attention", lambda module, q, k, v, mask, **kw: real_sdpa(
            module, q, k, v, mask, **kw))
        slow = decode_one_token(model, token, again)
    assert torch.allclose(fast, slow, atol=1e-4)

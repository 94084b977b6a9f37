"""The prefix cache: the next turn of a chat computes only its new tokens, exactly as without the cache."""

import time

import pytest
import requests
import torch

from server.engine.budget import GenerationRequest
from server.engine.prefix_cache import PrefixCache, common_prefix
from server.model.tokenizer import ChatGLM2Tokenizer
from tests.conftest import REAL_TOKENIZER
from tests.test_http import parse_sse

GREEDY = dict(temperature=0.0)


def tensors(length: int, layers: int = 2, value: float = 0.0):
    """Keys and values per layer for `length` positions, each position holding its index (to check cuts)."""
    positions = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1) + value
    return [(positions.expand(1, 2, length, 4).clone(), positions.expand(1, 2, length, 4).clone())
            for _ in range(layers)]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], limit=2) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5], [6]) == 0


def test_lookup_takes_the_longest_common_prefix_cut_to_it_and_leaves_one_token_to_run():
    cache = PrefixCache(max_bytes=10**6)
    cache.store([1, 2, 3, 4, 5, 6], tensors(6))
    cache.store([1, 2, 9, 9], tensors(4, value=100))
    n, found = cache.lookup([1, 2, 3, 4, 7], "cpu")
    assert n == 4 and found[0][0].shape[2] == 4 and found[0][0][0, 0, :, 0].tolist() == [0, 1, 2, 3]
    n, found = cache.lookup([1, 2, 3, 4, 5, 6], "cpu")
    assert n == 5  # the whole entry matches, but the last prompt token must run to give the next logits
    n, found = cache.lookup([1, 2, 9, 9, 9], "cpu")
    assert n == 4 and found[1][1][0, 0, 0, 0] == 100
    assert cache.lookup([7, 7], "cpu") == (0, None)


def test_entries_are_evicted_least_recently_used_first_within_the_budget():
    one = sum(k.nbytes + v.nbytes for k, v in tensors(10))
    cache = PrefixCache(max_bytes=2 * one)
    cache.store([1] * 10, tensors(10))
    cache.store([2] * 10, tensors(10))
    cache.lookup([1] * 10 + [3], "cpu")  # [1]*10 is now the most recently used
    cache.store([3] * 10, tensors(10))
    assert cache.bytes <= cache.max_bytes and len(cache) == 2
    assert cache.lookup([2] * 5, "cpu")[0] == 0 and cache.lookup([1] * 5, "cpu")[0] == 4
    cache.store([4] * 30, tensors(30))  # larger than the whole budget: not kept, nothing evicted for it
    assert len(cache) == 2 and cache.lookup([4] * 5, "cpu")[0] == 0
    assert cache.usage()["entries"] == 2


def test_an_entry_that_a_longer_one_extends_is_dropped():
    cache = PrefixCache(max_bytes=10**6)
    cache.store([1, 2, 3], tensors(3))
    cache.store([1, 2, 3, 4, 5], tensors(5))
    assert len(cache) == 1 and cache.lookup([1, 2, 3, 4, 5, 6], "cpu")[0] == 5


def test_a_job_never_writes_into_a_cached_entry(engine, tiny_model):
    """Caches only concatenate into new tensors: an entry stays as stored while jobs grow from it."""
    first = engine.submit(GenerationRequest(query="hello", max_new_tokens=5, **GREEDY)).wait()
    (entry,) = engine.prefix_cache.entries.values()
    before = [(k.clone(), v.clone()) for k, v in entry.tensors]
    again = engine.submit(GenerationRequest(query="hello", max_new_tokens=5, **GREEDY)).wait()
    assert again.cached_tokens == again.prompt_tokens - 1 and again.text == first.text
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(entry.tensors, before))


def chat(engine, turns: int, reply_tokens: int = 12):
    """A multi-turn greedy chat; each turn's history holds the replies as the server showed them."""
    history, finished = [], []
    for turn in range(turns):
        done = engine.submit(GenerationRequest(query=f"第{turn}个问题 question {turn}", history=list(history),
                                               max_new_tokens=reply_tokens, **GREEDY)).wait()
        history.append((f"第{turn}个问题 question {turn}", done.text))
        finished.append(done)
    return finished


def test_later_turns_reuse_the_conversation_and_float32_greedy_output_is_unchanged(engine_for, tiny_model):
    without = chat(engine_for(tiny_model, prompt_cache_mb=0), turns=4)
    engine = engine_for(tiny_model)
    with_cache = chat(engine, turns=4)
    assert [f.text for f in with_cache] == [f.text for f in without]
    assert all(f.cached_tokens == 0 for f in without)
    # the first question after the start: the chat template's start, run into the cache at start
    assert with_cache[0].cached_tokens == len(engine.loaded.tokenizer.conversation_start()) > 0
    for before, after in zip(with_cache, with_cache[1:]):
        # at least the previous prompt is reused: its reply re-encodes differently at times (random weights
        # sample odd token splits), so only the common prefix counts
        assert after.cached_tokens >= before.prompt_tokens
        assert after.cached_tokens < after.prompt_tokens


def test_a_batched_job_starts_from_a_cached_prefix(engine_for, slow_model):
    engine = engine_for(slow_model, max_batch=2)
    base = GenerationRequest(query="a question asked before", max_new_tokens=6, **GREEDY)
    engine.submit(base).wait()
    expected = engine_for(slow_model, max_batch=1, prompt_cache_mb=0).submit(base).wait().text
    other = engine.submit(GenerationRequest(query="something else entirely", max_new_tokens=40, **GREEDY))
    other.next_event(timeout=30)
    repeat = engine.submit(base).wait(timeout=60)  # joins the batch with `other`, from the cache
    assert other.result is None and repeat.cached_tokens == repeat.prompt_tokens - 1
    assert repeat.text == expected


def test_every_route_hits_the_cache_and_reports_it(server, caplog):
    caplog.set_level("INFO", logger="server.requests")
    body = {"query": "你好", "history": [["hi", "hello"]], "max_length": 60, "temperature": 0}
    first = parse_sse(requests.post(server.url + "/stream", json=body).content)[-1][1]
    second = parse_sse(requests.post(server.url + "/stream", json=body).content)[-1][1]
    start = len(server.engine.loaded.tokenizer.conversation_start())  # in the cache from the start
    assert first["cached_tokens"] == start and second["cached_tokens"] == second["prompt_tokens"] - 1
    # the dedicated client's /generate has no summary event: the request log line says it
    r = requests.post(server.url + "/generate", json={**body, "stream": False})
    for _ in range(50):  # bounded: the line is written as the job ends
        if f"job {r.headers['X-Job-Id']} /generate" in caplog.text:
            break
        time.sleep(0.02)
    line = next(x.getMessage() for x in caplog.records if f"job {r.headers['X-Job-Id']} /generate" in x.getMessage())
    assert f"prompt={second['prompt_tokens']} cached={second['prompt_tokens'] - 1} " in line
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "你好"}]
    r = requests.post(server.url + "/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 20, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == r["usage"]["prompt_tokens"] - 1


@pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="the real ChatGLM2 tokenizer is not on this machine")
def test_replies_as_a_real_model_writes_them_re_encode_to_the_same_ids():
    """The next turn re-encodes the reply as text; when the model wrote it the way the tokenizer splits it (as a
    trained model nearly always does), the whole previous prompt + reply is a prefix of the next prompt."""
    tok = ChatGLM2Tokenizer(REAL_TOKENIZER)
    replies = ["你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你，欢迎问我任何问题。",
               "当然可以：\n\n```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
               "    return a\n```\n\n这个函数返回第 n 项。",
               "The capital of France is Paris.", "1. 苹果\n2. 香蕉\n3. 橙子", "Résumé: naïve café — 1,234.5 元"]
    for reply in replies:
        prompt = tok.build_prompt("问题", [])
        written = tok.build_prompt("问题", [], reply)[len(prompt):]  # the reply as the model generates it
        assert tok.build_prompt("问题", [], reply)[:len(prompt)] == prompt
        following = tok.build_prompt("下一个问题", [("问题", reply)])
        assert following[:len(prompt) + len(written)] == prompt + written

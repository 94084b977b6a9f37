"""logprobs (chat and text completions, echo) and n choices: values checked against the model run directly."""

import math

import openai
import pytest
import torch
from transformers import DynamicCache

from server.engine.budget import GenerationRequest
from server.model.forward import prefill

ASK = [{"role": "user", "content": "你好"}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@torch.inference_mode()
def reference_logprobs(loaded, prompt_ids: list[int], reply_ids: list[int]) -> list[torch.Tensor]:
    """log-softmax of the model's logits before each reply token, run directly (no engine, no cache reuse)."""
    cache = DynamicCache(config=loaded.model.config)
    rows, logits = [], prefill(loaded.model, prompt_ids, cache)
    for token in reply_ids:
        rows.append(torch.log_softmax(logits.float(), -1))
        logits = prefill(loaded.model, [token], cache)
    return rows


def ids_of(tokenizer, names: list[str]) -> list[int]:
    by_name = {tokenizer.token_name(i): i for i in range(tokenizer.first_special_id)}
    return [by_name[name] for name in names]


def test_chat_logprobs_are_the_models_own(client, tiny_model):
    result = client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 12
    tok = tiny_model.tokenizer
    reply = ids_of(tok, [entry.token for entry in content])
    rows = reference_logprobs(tiny_model, tok.build_prompt("你好", []), reply)
    for entry, token, row in zip(content, reply, rows):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert bytes(entry.bytes) == tok.token_bytes(token)
        top = [alt.logprob for alt in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top[0] == pytest.approx(float(row[:tok.first_special_id].max()), abs=1e-4)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token is the most likely
    assert "".join(entry.token for entry in content).strip() == result.choices[0].message.content


def test_streamed_logprobs_add_up_to_the_whole(client):
    kwargs = dict(model="chatglm2-6b", messages=ASK, max_tokens=10, temperature=0, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(**kwargs, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    # (the second request finds its prompt in the prefix cache: equal up to float rounding)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)


def test_no_logprobs_unless_asked(client):
    result = client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=4)
    assert result.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=4, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=4, logprobs=True,
                                       top_logprobs=21)


def test_n_choices_each_follow_their_own_seed(client):
    kwargs = dict(model="chatglm2-6b", messages=ASK, max_tokens=10, temperature=1.5, top_p=1.0)
    together = client.chat.completions.create(**kwargs, n=3, seed=40)
    assert [c.index for c in together.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(**kwargs, seed=40 + i).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in together.choices] == alone
    assert len(set(alone)) > 1
    assert together.usage.prompt_tokens == client.chat.completions.create(**kwargs, seed=1).usage.prompt_tokens
    assert together.usage.completion_tokens == 30


def test_n_choices_stream_with_their_indices(client):
    chunks = list(client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=6, n=2, seed=3,
                                                 temperature=1.2, stream=True))
    text = {0: "", 1: ""}
    finished = []
    for chunk in chunks:
        choice = chunk.choices[0]
        text[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.append(choice.index)
    whole = client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=6, n=2, seed=3,
                                           temperature=1.2)
    assert sorted(finished) == [0, 1]
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]


def test_n_choices_run_their_prompt_once(engine, tiny_model, prefill_lengths):
    """Choices of one request are admitted together and share one prefill: the prompt runs once."""
    lengths = prefill_lengths
    jobs = engine.submit_all([GenerationRequest(query="共享的问题 shared prompt", max_new_tokens=4, temperature=1.0,
                                                seed=i) for i in range(3)])
    results = [job.wait(timeout=60) for job in jobs]
    assert all(r.finish_reason == "length" and r.completion_tokens == 4 for r in results)
    prompt = len(jobs[0].prompt.ids) - len(tiny_model.tokenizer.conversation_start())  # (cached at start)
    assert results[0].cached_tokens == results[1].cached_tokens == len(jobs[0].prompt.ids) - prompt
    assert lengths.count(prompt) == 1, lengths


def test_n_above_the_batch_is_refused(client, engine):
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=2, n=engine.max_batch + 1)


def test_text_completion_continues_the_raw_prompt(client, tiny_model):
    tok = tiny_model.tokenizer
    result = client.completions.create(model="chatglm2-6b", prompt="Hello world", max_tokens=8, temperature=0)
    ids = tok.prompt_prefix() + tok.sp.encode("Hello world")
    cache, reply = DynamicCache(config=tiny_model.model.config), []
    with torch.inference_mode():
        logits = prefill(tiny_model.model, ids, cache)
        for _ in range(8):
            logits = logits.clone()
            logits[tok.first_special_id:] = float("-inf")
            reply.append(int(logits.argmax()))
            logits = prefill(tiny_model.model, [reply[-1]], cache)
    expected = b"".join(tok.token_bytes(t) for t in reply).decode("utf-8", "replace")
    assert result.choices[0].text == expected.rstrip("\ufffd")  # a raw continuation keeps its leading space
    assert result.object == "text_completion" and result.usage.prompt_tokens == len(ids)


def test_echo_scores_the_prompt_as_the_model_does(client, tiny_model):
    tok = tiny_model.tokenizer
    prompt = "The quick brown fox"
    result = client.completions.create(model="chatglm2-6b", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = result.choices[0]
    ids = tok.prompt_prefix() + tok.sp.encode(prompt)
    assert choice.text == prompt and result.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
    with torch.inference_mode():
        logits = prefill(tiny_model.model, ids, DynamicCache(config=tiny_model.model.config), every_position=True)
    rows = torch.log_softmax(logits.float(), -1)
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(float(rows[i - 1, ids[i]]), abs=1e-4)
        assert len(logprobs.top_logprobs[i]) == 2
    # offsets point into the returned text (after the first piece, whose leading space the text does not have)
    for token, offset in zip(logprobs.tokens[3:], logprobs.text_offset[3:]):
        assert choice.text[offset:offset + len(token)] == token
    total = sum(lp for lp in logprobs.token_logprobs[1:])
    assert math.isfinite(total) and total < 0


def test_echo_with_a_completion_and_token_id_prompts(client, tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.prompt_prefix() + tok.sp.encode("Hello")
    by_text = client.completions.create(model="chatglm2-6b", prompt="Hello", max_tokens=5, temperature=0,
                                        echo=True, logprobs=0)
    by_ids = client.completions.create(model="chatglm2-6b", prompt=ids, max_tokens=5, temperature=0, echo=True,
                                       logprobs=0)
    assert by_text.choices[0].logprobs.token_logprobs == by_ids.choices[0].logprobs.token_logprobs
    assert len(by_text.choices[0].logprobs.tokens) == len(ids) + 5
    assert by_text.choices[0].text.startswith("Hello")


def test_several_prompts_and_n_in_one_request(client):
    result = client.completions.create(model="chatglm2-6b", prompt=["A", "B"], max_tokens=3, n=2, seed=9,
                                       temperature=1.0)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    alone = client.completions.create(model="chatglm2-6b", prompt="B", max_tokens=3, seed=10, temperature=1.0)
    assert result.choices[3].text == alone.choices[0].text


def test_streamed_text_completion_equals_the_whole(client):
    kwargs = dict(model="chatglm2-6b", prompt="Once upon a time", max_tokens=12, temperature=0, echo=True,
                  logprobs=1)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]


@pytest.mark.parametrize("kwargs, words", [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": [[1, 2, 10**9]]}, "token id"),
    ({"prompt": [{"x": 1}]}, "prompt"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
])
def test_bad_text_completions_are_400(client, kwargs, words):
    args = {"model": "chatglm2-6b", "prompt": "hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**args)
    assert words in caught.value.body["message"]


def test_a_front_end_refuses_logprobs_by_name(serve, front_for, engine):
    server = serve(front_for(engine))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="chatglm2-6b", messages=ASK, max_tokens=2, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="chatglm2-6b", prompt="hi", max_tokens=2, logprobs=1)
    assert client.completions.create(model="chatglm2-6b", prompt="hi", max_tokens=3, temperature=0).choices[0].text

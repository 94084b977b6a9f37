"""Fitting history into the context: the fast cut finds exactly what dropping one round at a time finds."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.budget import ContextOverflow, GenerationRequest, fit_prompt, rounds_to_drop
from server.model.tokenizer import ChatGLM2Tokenizer

WORDS = ["你好", "世界", "hello", "world", "天气", " ", "\n", "[Round 3]", "答：", "😀", "9", "99"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return ChatGLM2Tokenizer(tiny_checkpoint / "tokenizer.model")


def one_at_a_time(tokenizer, request, limit):
    """The reference: drop the oldest round and re-tokenize everything, until it fits."""
    history, dropped = list(request.history), 0
    while len(tokenizer.build_prompt(request.query, history, request.answer_prefix)) > limit and history:
        history.pop(0)
        dropped += 1
    return dropped


texts = st.lists(st.sampled_from(WORDS), max_size=12).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(st.tuples(texts, texts), max_size=15), query=texts, prefix=texts,
       limit=st.integers(min_value=5, max_value=400))
def test_the_cut_is_the_one_round_by_round_dropping_finds(tokenizer, history, query, prefix, limit):
    request = GenerationRequest(query=query, history=history, answer_prefix=prefix)
    assert rounds_to_drop(tokenizer, request, limit) == one_at_a_time(tokenizer, request, limit)


def test_hundreds_of_rounds_fit_and_overflow_still_says_how_much(tokenizer):
    rounds = [(f"问题 {i} hello 世界", f"回答 {i} world 你好" * 3) for i in range(600)]
    fitted = fit_prompt(tokenizer, GenerationRequest(query="你好", history=rounds), 2048, 256)
    assert 0 < fitted.dropped_rounds < 600 and len(fitted.ids) <= 2048 - 256
    assert fitted.dropped_rounds == one_at_a_time(tokenizer, GenerationRequest(query="你好", history=rounds),
                                                  2048 - 256)
    with pytest.raises(ContextOverflow):
        fit_prompt(tokenizer, GenerationRequest(query="hello " * 3000, history=rounds), 2048, 256)

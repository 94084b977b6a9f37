"""Tokenizer and prompt: token-for-token with the reference, and streaming decode without broken characters."""

import random

import pytest

from server.model.tokenizer import ChatGLM2Tokenizer, chat_text, clean_reply
from tests.conftest import REAL_TOKENIZER

needs_real = pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="the real ChatGLM2 tokenizer.model is absent")


@pytest.fixture(scope="module")
def real():
    return ChatGLM2Tokenizer(REAL_TOKENIZER)


@needs_real
def test_prompt_ids_match_the_reference(real):
    ids = real.build_prompt("今天天气怎么样？", [("你好", "你好！有什么可以帮你的吗？")])
    assert len(ids) == 45
    assert ids[:18] == [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13,
                        54761, 31211, 39701, 13, 13, 55437, 31211, 39701]
    assert ids[-8:] == [31869, 33071, 35367, 31514, 13, 13, 55437, 31211]


@needs_real
@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_every_new_conversation_begins_with_the_templates_start(family):
    """What the engine runs into the prefix cache at start: the template up to the question, for any question,
    with an answer prefix too (ChatGLM2 folds a system text into the question: the same start)."""
    tok = ChatGLM2Tokenizer(REAL_TOKENIZER, family)
    start = tok.conversation_start()
    if family == "chatglm2":
        expected = tok.sp.encode("[Round 1]\n\n问：")
    else:
        expected = [tok.special_ids["<|user|>"]] + tok.sp.encode("\n")
    assert start == tok.prompt_prefix() + expected and len(expected) == {"chatglm2": 10, "chatglm3": 3}[family]
    prompts = [tok.build_prompt(q, []) for q in ("今天天气怎么样？", "Why?", "123", "  spaces", "问：")]
    prompts.append(tok.build_prompt("写一首诗", [], answer_prefix="好的，"))
    if family == "chatglm2":
        prompts.append(tok.build_prompt("hi", [], system="你是一个助手。"))
    assert all(ids[:len(start)] == start and len(ids) > len(start) for ids in prompts)
    # a question's first character may merge with the template's last piece ("：《" is one in ChatGLM2's
    # vocabulary): the prefix cache then reuses the start up to there
    title = tok.build_prompt("《三体》", [])
    shared = {"chatglm2": len(start) - 1, "chatglm3": len(start)}[family]
    assert title[:shared] == start[:shared] and title[:shared + 1] != start[:shared + 1]


@needs_real
def test_special_ids_follow_the_pieces(real):
    assert real.n_pieces == 64789
    assert real.special_ids == {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793}
    assert real.sp.unk_id() == 0 and real.sp.bos_id() == 1 and real.sp.eos_id() == 2


@needs_real
def test_pieces_for_counting(real):
    assert real.pieces("Hello 世界") == ["▁Hello", "▁世界"]
    assert len(real.pieces("Hello 世界")) == 2


@needs_real
def test_answer_prefix_is_encoded_with_the_prompt(real):
    plain = real.build_prompt("写一首诗", [])
    prefixed = real.build_prompt("写一首诗", [], answer_prefix="好的，")
    assert prefixed[: len(plain) - 1] == plain[:-1]
    assert real.decode(prefixed[2:]).endswith("答：好的，")


@needs_real
def test_decode_drops_special_and_padding_ids(real):
    ids = real.sp.encode("你好")
    assert real.decode([64790, 64792] + ids + [64793, 65000]) == "你好"


def stream(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    deltas = [decoder.add(i) for i in ids]
    deltas.append(decoder.flush())
    return deltas


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_stream_decoding_equals_full_decoding(tiny_checkpoint, which):
    if which == "real" and not REAL_TOKENIZER.exists():
        pytest.skip("the real ChatGLM2 tokenizer.model is absent")
    tok = ChatGLM2Tokenizer(REAL_TOKENIZER if which == "real" else tiny_checkpoint / "tokenizer.model")
    rng = random.Random(7)
    texts = ["你好！有什么可以帮你的吗？ Hello world.", "emoji 😀 and 𝄞 clef\n\n代码：`x = 1`", "  leading spaces",
             "ÅÄÖ ñ — “quotes” …"]
    for text in texts:
        ids = tok.sp.encode(text)
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        assert not any(d.endswith("\ufffd") for d in deltas)
    for _ in range(30):  # random ids, byte pieces included: streamed text still equals the full decode
        ids = [rng.randrange(3, tok.n_pieces) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stream_holds_back_incomplete_characters(tiny_checkpoint):
    tok = ChatGLM2Tokenizer(tiny_checkpoint / "tokenizer.model")
    ids = tok.sp.encode("😀")  # not in the tiny vocabulary: four byte-fallback pieces
    assert len(ids) >= 4
    deltas = stream(tok, ids)
    assert deltas[:-2] == [""] * (len(deltas) - 2) and "😀" in deltas[-2]


def test_special_ids_are_skipped_while_streaming(tiny_checkpoint):
    tok = ChatGLM2Tokenizer(tiny_checkpoint / "tokenizer.model")
    ids = tok.sp.encode("hello world")
    deltas = stream(tok, [tok.special_ids["sop"]] + ids + [tok.n_pieces + 20])
    assert "".join(deltas) == "hello world"


def test_chat_text_template():
    assert chat_text("Q2", [("Q1", "A1")], "P") == "[Round 1]\n\n问：Q1\n\n答：A1\n\n[Round 2]\n\n问：Q2\n\n答：P"


@pytest.mark.parametrize("raw, shown", [
    ("  你好 \n", "你好"),
    ("我的训练数据截止到[[训练时间]]。", "我的训练数据截止到2023年。"),
    ("", ""),
])
def test_clean_reply(raw, shown):
    assert clean_reply(raw) == shown

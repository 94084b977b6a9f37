"""`python -m server export`: a standard Hugging Face folder that plain transformers loads with no remote code,
giving the project's ids, prompts and logits."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.cli import main
from server.model.export import export, fast_tokenizer
from server.model.loader import load_model
from server.model.tokenizer import ChatGLM2Tokenizer
from server.web.messages import to_rounds
from tests.conftest import REAL_TOKENIZER, cpu_plan

CORPUS = ["你好", "Hello world", "  leading spaces", "a  b   c", "line1\nline2\n\n\tTab", "def f(x):\n    return x**2\n",
          "emoji 😀👍🏽 ok", "混合 English 和中文，标点！？", "[Round 1]\n\n问：你好\n\n答：", "   ", "\n", "trailing   ",
          "Résumé naïve café", "1,234.5 元 100%", "ｆｕｌｌｗｉｄｔｈ　全角", "hello world 你好"]
MESSAGES = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "s1"}, {"role": "developer", "content": "s2"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, {"role": "user", "content": "q2b"},
     {"role": "assistant", "content": "好的，"}],
    [{"role": "assistant", "content": "先说"}, {"role": "user", "content": [{"type": "text", "text": "分"},
                                                                           {"type": "text", "text": "段"}]}],
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 \n\t.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + \
        list("你好世界中文测试的了是在不一有人这我们他来说为上国个到时大地也子就而要于以会可出下过能对学生") + \
        list("，。！？、；：“”（）《》…—") + ["😀", "👍🏽", "é", "ß", "Ж", "∑", "　", "\u200b", "\r"]
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(n)]


def assert_same_tokenization(tokenizer_model, texts):
    fast, sp = fast_tokenizer(tokenizer_model)
    for text in texts:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert fast.decode(ids) == sp.decode(ids), repr(text)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("export") / "chatglm2-hf", dtype="float32")


def test_the_export_is_a_standard_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    assert not any(name.endswith(".py") for name in names)  # nothing to trust
    config = json.loads((exported / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["GlmForCausalLM"] and config["torch_dtype"] == "float32"
    generation = json.loads((exported / "generation_config.json").read_text(encoding="utf-8"))
    assert (generation["eos_token_id"], generation["top_p"], generation["temperature"]) == (2, 0.7, 1.0)
    index = json.loads((exported / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert set(index["weight_map"].values()) <= names


def test_plain_transformers_gives_the_projects_ids_prompts_and_logits(exported, tiny_checkpoint, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ours = ChatGLM2Tokenizer(tiny_checkpoint / "tokenizer.model")
    for text in CORPUS + random_texts(300):
        assert tokenizer.encode(text, add_special_tokens=False) == ours.sp.encode(text), repr(text)
    assert tokenizer.convert_tokens_to_ids(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]) == \
        list(range(ours.n_pieces, ours.n_pieces + 5))
    for messages in MESSAGES:
        query, history, prefix = to_rounds(messages)
        expected = ours.build_prompt(query, history, prefix)
        assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == expected, messages
    model = AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.tensor([ours.build_prompt("hello world", [("你好", "世界")])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model.model(ids).logits)


def test_bfloat16_export_and_an_occupied_folder(tiny_checkpoint, tmp_path):
    out = export(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    loaded = load_model(tiny_checkpoint, cpu_plan(dtype="bfloat16"))
    ids = torch.tensor([loaded.tokenizer.build_prompt("hi", [])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    with pytest.raises(FileExistsError, match="already holds a model"):
        export(tiny_checkpoint, out)


def test_the_command_line_exports(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "cli"), "--model-dir", str(tiny_checkpoint), "--offline"]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == "float16"
    assert main(["export", "--model-dir", str(tiny_checkpoint), "--offline"]) == 1  # no folder given


@pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="the real ChatGLM2 tokenizer is not on this machine")
def test_the_real_tokenizer_exports_with_the_same_ids():
    assert_same_tokenization(REAL_TOKENIZER, CORPUS + random_texts(2000, seed=1))


def test_a_chatglm3_export_speaks_chatglm3(tmp_path):
    """Its template, special tokens and stops follow ChatGLM3: plain transformers gives our ids and logits."""
    from server.model.family import CHATGLM3
    from server.model.tokenizer import load_tokenizer
    from server.model.tool_prompt import ChatGLM3Tools
    from server.web.messages import to_chat
    from tests.checkpoint_factory import write_checkpoint
    from tests.test_family import chatglm3_files

    folder = chatglm3_files(write_checkpoint(tmp_path / "glm3", seed=4), "generation_config")
    out = export(folder, tmp_path / "glm3-hf", dtype="float32")
    ours = load_tokenizer(folder)
    assert ours.family == CHATGLM3
    tokenizer = AutoTokenizer.from_pretrained(out)
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert tokenizer.convert_tokens_to_ids(roles) == [ours.special_ids[r] for r in roles]
    tool_loop = [{"role": "user", "content": "天气"}, {"role": "tool", "content": "晴"},
                 {"role": "tool", "content": "25°C"}, {"role": "assistant", "content": "晴，"}]
    for messages in MESSAGES + [tool_loop]:
        system, query, history, prefix = to_chat(messages, "", ChatGLM3Tools())
        expected = ours.build_prompt(query, history, prefix, system)
        assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == expected, messages
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == [2, ours.special_ids["<|user|>"], ours.special_ids["<|observation|>"]]
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = load_model(folder, cpu_plan())
    ids = torch.tensor([ours.build_prompt("hello", [("你好", "世界")], system="S")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)

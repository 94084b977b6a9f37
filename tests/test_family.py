"""The GLM family: --model names, the prompt format read from a folder's files, ChatGLM3's messages and stops."""

import json

import pytest

from server.config import PROJECT_ROOT, Settings
from server.engine.budget import GenerationRequest
from server.model.family import CHATGLM2, CHATGLM3, detect_family
from server.model.tokenizer import ChatGLM2Tokenizer, load_tokenizer
from server.web.messages import to_chat
from tests.checkpoint_factory import write_checkpoint
from tests.conftest import REAL_TOKENIZER, cpu_plan

GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION = 64790, 64792, 64794, 64795, 64796, 64797  # ChatGLM3's ids


def chatglm3_files(folder, how: str):
    """Mark a folder as ChatGLM3 the ways the published files do."""
    if how == "generation_config":
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 64795, 64797]}))
    elif how == "tokenizer_config":
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}<|assistant|>"}))
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "THUDM/chatglm3-6b"}))
    return folder


@pytest.fixture(scope="module")
def chatglm3_checkpoint(tmp_path_factory):
    return chatglm3_files(write_checkpoint(tmp_path_factory.mktemp("glm3")), "generation_config")


@pytest.mark.parametrize("how", ["generation_config", "tokenizer_config", "config"])
def test_chatglm3_is_read_from_the_folders_files(tmp_path, how):
    folder = write_checkpoint(tmp_path / "any-name")
    assert detect_family(folder) == CHATGLM2
    assert detect_family(chatglm3_files(folder, how)) == CHATGLM3


def test_the_folders_name_does_not_decide(tmp_path):
    assert detect_family(write_checkpoint(tmp_path / "chatglm3-6b")) == CHATGLM2


@pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="the real tokenizer (../shared/chatglm2) is not here")
def test_chatglm3_prompt_ids_follow_the_reference_format():
    """Expected ids written from ChatGLM3's published format (build_chat_input: each message is its role id, the
    encoded "\\n" of an empty metadata line and the encoded text; [gMASK] sop first, <|assistant|> last)."""
    tok = ChatGLM2Tokenizer(REAL_TOKENIZER, family=CHATGLM3)
    sp = tok.sp
    assert [tok.special_ids[name] for name in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>",
                                               "<|observation|>")] == [GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION]
    nl = sp.encode("\n")
    expected = ([GMASK, SOP, SYSTEM] + nl + sp.encode("你是一个助手。") + [USER] + nl + sp.encode("你好")
                + [ASSISTANT] + nl + sp.encode("你好！有什么可以帮你？") + [USER] + nl + sp.encode("讲个笑话") + [ASSISTANT])
    assert tok.build_prompt("讲个笑话", [("你好", "你好！有什么可以帮你？")], system="你是一个助手。") == expected
    assert tok.stop_ids == {2, USER, OBSERVATION}
    assert tok.prompt_text("讲个笑话", [], system="S") == "[gMASK]sop<|system|>\n S<|user|>\n 讲个笑话<|assistant|>"
    # ChatGLM2 keeps its format: no role tokens, the system text before the first question
    glm2 = ChatGLM2Tokenizer(REAL_TOKENIZER)
    assert glm2.build_prompt("讲个笑话", [], system="S") == glm2.build_prompt("S\n\n讲个笑话", [])
    assert glm2.stop_ids == {2} and "<|user|>" not in glm2.special_ids


def test_openai_system_messages_become_chatglm3s_system_role(chatglm3_checkpoint):
    tok = load_tokenizer(chatglm3_checkpoint)
    system, query, history, prefix = to_chat([{"role": "system", "content": "简洁"},
                                              {"role": "user", "content": "hi"}])
    ids = tok.build_prompt(query, history, prefix, system)
    assert ids[2] == tok.special_ids["<|system|>"] and ids[-1] == tok.special_ids["<|assistant|>"]
    assert ids.count(tok.special_ids["<|user|>"]) == 1


def test_a_chatglm3_reply_ends_at_the_next_turns_role(engine_for, chatglm3_checkpoint, tiny_checkpoint):
    from server.model.loader import load_model

    glm3 = engine_for(load_model(chatglm3_checkpoint, cpu_plan()))
    tok = glm3.loaded.tokenizer
    user = tok.special_ids["<|user|>"]
    pushed = GenerationRequest(query="hi", max_new_tokens=20, temperature=0, logit_bias={user: 100.0})
    done = glm3.submit(pushed).wait(timeout=60)
    assert done.finish_reason == "stop" and done.completion_tokens == 0 and done.text == ""
    # ChatGLM2 has no such token: the same id stays banned, the reply goes on
    glm2 = engine_for(load_model(tiny_checkpoint, cpu_plan()))
    assert glm2.submit(pushed).wait(timeout=60).completion_tokens == 20


def test_model_names_choose_repository_and_folder():
    chosen = Settings.from_changes({"model": "chatglm3-6b"})
    assert chosen.repo == "THUDM/chatglm3-6b" and chosen.model_dir == PROJECT_ROOT / "THUDM" / "chatglm3-6b"
    mine = Settings.from_changes({"model": "chatglm3-6b-32k", "model_dir": "/data/glm"})
    assert mine.repo == "THUDM/chatglm3-6b-32k" and str(mine.model_dir) == "/data/glm"
    assert Settings.from_changes({}).repo == "THUDM/chatglm2-6b"


def test_health_names_the_model_and_its_format(serve, engine_for, tmp_path):
    """The name is the one the folder's config.json gives (as the published configs do), whatever --repo says."""
    import requests

    from server.model.loader import load_model

    folder = chatglm3_files(write_checkpoint(tmp_path / "any-folder"), "config")
    server = serve(engine_for(load_model(folder, cpu_plan())), model_dir=folder)
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["name"] == "chatglm3-6b" and health["prompt_format"] == CHATGLM3
    models = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["chatglm3-6b"]
    tags = requests.get(server.url + "/api/tags", timeout=10).json()["models"]
    assert [m["name"] for m in tags] == ["chatglm3-6b:latest"]


def test_a_folder_with_the_tokenizer_alone_speaks_the_chosen_models_format(tmp_path, chatglm3_checkpoint):
    """A front end (--backend) downloads tokenizer.model only: the chosen --model says the format then; a folder
    with its own files still decides for itself."""
    from server.startup import load_tokenizer_for

    alone = tmp_path / "front"
    alone.mkdir()
    (alone / "tokenizer.model").write_bytes((chatglm3_checkpoint / "tokenizer.model").read_bytes())
    front = Settings(model="chatglm3-6b", model_dir=alone, offline=True)
    assert load_tokenizer_for(front).family == CHATGLM3
    assert load_tokenizer_for(front.replace(model="chatglm2-6b")).family == CHATGLM2
    assert load_tokenizer(chatglm3_checkpoint, fallback_family=CHATGLM2).family == CHATGLM3


def test_a_downloaded_chatglm3_knows_its_format_from_its_generation_config(tmp_path, monkeypatch):
    """generation_config.json is fetched with the other small files: it alone marks this folder as ChatGLM3."""
    from server.setup import bootstrap
    from tests.fake_hub import FakeHub

    source = chatglm3_files(write_checkpoint(tmp_path / "source"), "generation_config")
    hub = FakeHub(source, repo="THUDM/chatglm3-6b")
    try:
        folder = tmp_path / "THUDM" / "chatglm3-6b"
        bootstrap.ensure_model(Settings(repo="THUDM/chatglm3-6b", model_dir=folder, mirror=hub.url))
    finally:
        hub.close()
    assert (folder / "generation_config.json").is_file()
    assert load_tokenizer(folder).family == CHATGLM3

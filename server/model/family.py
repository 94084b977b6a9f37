"""The GLM models this server knows: which repository each name downloads, and which prompt format a model
folder speaks (read from its own files, never from the folder's name).

ChatGLM2 chats in numbered rounds of 问/答 text after `[gMASK] sop`. ChatGLM3 (the same network) has role
tokens after the five ChatGLM2 specials — <|system|>, <|user|>, <|assistant|>, <|observation|> — and builds
each message as its role token, a metadata line (empty for chat) and the text; the prompt ends with
<|assistant|>, and a reply ends when the model writes eos, <|user|> or <|observation|>.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATGLM2, CHATGLM3 = "chatglm2", "chatglm3"
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def detect_family(folder: Path, fallback: str = CHATGLM2) -> str:
    """chatglm3 when the folder's files say so: its generation config stops on <|user|> (id 64795 after the
    ChatGLM2 vocabulary's 64,789 pieces and 5 specials), its tokenizer config names a role token, or its config
    names a chatglm3 model; chatglm2 otherwise. `fallback` when the folder has none of those files (a front
    end's folder holds only tokenizer.model: then the chosen --model decides)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("generation_config.json", "tokenizer_config.json",
                                                       "config.json")):
        return fallback
    generation = read_json(folder / "generation_config.json")
    stops = generation.get("eos_token_id")
    if isinstance(stops, list) and 64795 in stops:
        return CHATGLM3
    tokenizer_config = read_json(folder / "tokenizer_config.json")
    if any(role in json.dumps(tokenizer_config) for role in CHATGLM3_ROLES):
        return CHATGLM3
    names = [read_json(folder / "config.json").get("_name_or_path"), tokenizer_config.get("name_or_path")]
    if any(isinstance(name, str) and "chatglm3" in name.lower() for name in names):
        return CHATGLM3
    return CHATGLM2


def family_of(model_name: str) -> str:
    """The prompt format of a --model name."""
    return CHATGLM3 if model_name.startswith("chatglm3") else CHATGLM2


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}

"""The files of a ChatGLM2 checkpoint folder (hub layout). Light on purpose: no torch, so the server can answer
HTTP (and say what is missing) before the model stack is imported."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BrokenIndex  # noqa: F401 (defined in errors.py, importable here too)
from .family import read_json

INDEX_NAMES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
SINGLE_NAMES = ("pytorch_model.bin", "model.safetensors")
CACHE_NAME = "converted"  # where convert.py keeps the native-layout copy
PACKED_INT4_SIZE = 0.31  # chatglm2-6b-int4's download against the float16 checkpoint (3.9 GB of 12.5)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: the shards an index names, or a single file."""
    for index_name in INDEX_NAMES:
        index = model_dir / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
                raise BrokenIndex(f"模型文件损坏 / {index} is not a weight index ({str(exc)[:60]}): delete it and "
                                  "start again to download it again") from exc
            return [model_dir / s for s in shards]
    for single in SINGLE_NAMES:
        if (model_dir / single).exists():
            return [model_dir / single]
    return []


def missing_files(model_dir: Path) -> list[str]:
    """Files the loader needs that the folder lacks (weights are listed by the index when there is one)."""
    needed = ["config.json", "tokenizer.model"]
    missing = [n for n in needed if not (model_dir / n).exists()]
    files = weight_files(model_dir)
    if not files:
        missing.append(INDEX_NAMES[0] + " (or another weight index / single weight file)")
    missing += [f.name for f in files if not f.exists()]
    return missing


def source_bits(model_dir: Path) -> int | None:
    """The bits of a checkpoint that stores quantized weights (4 for chatglm2-6b-int4), None for a float one."""
    bits = read_config(model_dir).get("quantization_bit")
    return bits if isinstance(bits, int) and bits > 0 else None


def trained_context(model_dir: Path) -> int | None:
    """The context a long-context model was tuned for: `seq_length` where `rope_ratio` stretches the positions
    (chatglm2-6b-32k, chatglm3-6b-32k: 32,768); None for the others, whose chat context is 8,192 (ChatGLM2-6B's
    config says 32,768 positions, but it was tuned on 8k conversations)."""
    config = read_config(model_dir)
    ratio, length = config.get("rope_ratio", 1), config.get("seq_length")
    long = isinstance(ratio, (int, float)) and ratio > 1 and isinstance(length, int) and length > 0
    return length if long else None


def read_config(model_dir: Path) -> dict:
    """The folder's config.json ({} when missing or unreadable)."""
    return read_json(Path(model_dir) / "config.json")

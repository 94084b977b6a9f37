"""Writes ChatGLM2 checkpoints in the hub layout of THUDM/chatglm2-6b, with random weights, for tests and bench.

The folder holds what the hub has: a chatglm `config.json`, `tokenizer_config.json`, a sentencepiece
`tokenizer.model` trained here (unk=0, bos=1, eos=2, byte fallback), and float16 weights in sharded `.bin` files
with an index, under the reference implementation's tensor names. A decoy `modeling_chatglm.py` that raises
when imported shows that nothing from the folder is executed.

The residual stream's dimension 0 is held at a positive constant (embeddings set it, no layer writes it), so the
logit of eos is exactly `eos_bias * normed_x0`: negative keeps replies going until max_length, positive ends
every reply at once. That gives tests deterministic `length` and `stop` finishes from a real model.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import sentencepiece
import torch

WORDS_ZH = ["你好", "世界", "今天", "天气", "怎么样", "有什么", "可以", "帮", "你", "的", "吗", "我", "是", "一个",
            "语言", "模型", "问题", "答案", "中国", "北京", "学习", "时间"]
WORDS_EN = ["hello", "world", "the", "model", "answer", "question", "weather", "today", "good", "time", "learn",
            "language", "chat", "server"]

TINY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
            ffn_hidden_size=128, seq_length=2048)


def train_tokenizer(path: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """A small sentencepiece model with ChatGLM2's special ids (unk=0, bos=1, eos=2) and byte fallback."""
    rng = random.Random(seed)
    words = WORDS_ZH + WORDS_EN
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    lines += ["[Round 1]\n\n问：你好\n\n答：你好！", "Hello 世界"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2,
    )
    path.with_suffix(".vocab").unlink(missing_ok=True)
    return path


def chatglm_config(padded_vocab_size: int, **shape) -> dict:
    cfg = {
        "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "layernorm_epsilon": 1e-05, "multi_query_attention": True, "original_rope": True,
        "padded_vocab_size": padded_vocab_size, "post_layer_norm": True, "rmsnorm": True, "use_cache": True,
        "torch_dtype": "float16", "transformers_version": "4.27.1", "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0,
    }
    cfg.update(TINY)
    cfg.update(shape)
    return cfg


def random_weights(cfg: dict, eos_bias: float, seed: int,
                   byte_ids: list[int] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Reference-named float16 tensors, one at a time (a full-size model never sits in RAM); dimension 0 of the
    residual stream is a constant (see module doc).

    Byte-fallback pieces get a lower logit the same way, so replies are mostly whole words, as with a real model.
    """
    g = torch.Generator().manual_seed(seed)
    h, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * cfg["kv_channels"]

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def half(t):
        return t.to(torch.float16)

    embed = rand(vocab, h, scale=1.0)
    embed[:, 0] = 3.0
    yield "transformer.embedding.word_embeddings.weight", half(embed)
    del embed
    yield "transformer.rotary_pos_emb.inv_freq", 1.0 / 10000 ** (torch.arange(0, cfg["kv_channels"] // 2, 2)
                                                                 / (cfg["kv_channels"] // 2))
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        dense, down = rand(h, cfg["num_attention_heads"] * cfg["kv_channels"]), rand(h, ffn)
        dense[0], down[0] = 0.0, 0.0  # no layer writes dimension 0
        yield p + "input_layernorm.weight", half(1.0 + 0.1 * rand(h, scale=1.0))
        yield p + "self_attention.query_key_value.weight", half(rand(qkv_rows, h))
        yield p + "self_attention.query_key_value.bias", half(0.1 * rand(qkv_rows, scale=1.0))
        yield p + "self_attention.dense.weight", half(dense)
        yield p + "post_attention_layernorm.weight", half(1.0 + 0.1 * rand(h, scale=1.0))
        yield p + "mlp.dense_h_to_4h.weight", half(rand(2 * ffn, h))
        yield p + "mlp.dense_4h_to_h.weight", half(down)
    head = rand(vocab, h, scale=1.0)
    head[:, 0] = 0.0
    head[2, 0] = eos_bias
    head[list(byte_ids), 0] = -10.0
    yield "transformer.encoder.final_layernorm.weight", half(torch.ones(h))
    yield "transformer.output_layer.weight", half(head)


def tensor_count(cfg: dict) -> int:
    return 2 + 7 * cfg["num_layers"] + 2


def write_checkpoint(folder: Path, *, eos_bias: float = -30.0, seed: int = 0, shards: int = 2,
                     tokenizer: Path | None = None, vocab_size: int = 400, **shape) -> Path:
    """Write a ChatGLM2 checkpoint in the hub layout into `folder` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        train_tokenizer(folder / "tokenizer.model", vocab_size=vocab_size, seed=seed)
    else:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n_pieces = sp.get_piece_size()
    padded = shape.pop("padded_vocab_size", None) or -(-(n_pieces + 5) // 64) * 64
    cfg = chatglm_config(padded, **shape)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}},
        indent=2), encoding="utf-8")
    (folder / "modeling_chatglm.py").write_text("raise RuntimeError('remote code must never run')\n")

    tensors = random_weights(cfg, eos_bias, seed, [i for i in range(n_pieces) if sp.is_byte(i)])
    per_shard = -(-tensor_count(cfg) // shards)
    weight_map, total = {}, 0
    for i in range(shards):  # one shard in RAM at a time
        shard_name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = dict(itertools.islice(tensors, per_shard))
        torch.save(part, folder / shard_name)
        weight_map.update(dict.fromkeys(part, shard_name))
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return folder


INT4_LINEARS = ("self_attention.query_key_value.weight", "self_attention.dense.weight", "mlp.dense_h_to_4h.weight",
                "mlp.dense_4h_to_h.weight")


def pack_int4_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack one float weight as the reference quantization.py does for chatglm2-6b-int4: one
    float16 scale per row (absmax / 7), values rounded to integers, and byte j of a row holding column 2j in its
    high nibble and column 2j + 1 in its low one: (w[2j] << 4) | (w[2j+1] & 0xF)."""
    scale = (weight.float().abs().amax(dim=-1) / 7).half()
    values = torch.round(weight.float() / scale.float()[:, None]).to(torch.int16)
    packed = (values[:, 0::2] << 4) | (values[:, 1::2] & 0xF)
    return packed.to(torch.int8), scale


def write_int4_checkpoint(folder: Path, source: Path) -> Path:
    """The checkpoint at `source` as THUDM/chatglm2-6b-int4 publishes it: a single pytorch_model.bin whose four
    linear layers per block are packed int4 (`.weight` int8 [N, K/2] and `.weight_scale` [N]), the rest float16,
    and `quantization_bit: 4` in config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    cfg = json.loads((source / "config.json").read_text(encoding="utf-8"))
    cfg.update(quantization_bit=4, _name_or_path="THUDM/chatglm2-6b-int4")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    index = json.loads((source / "pytorch_model.bin.index.json").read_text(encoding="utf-8"))
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, tensor in torch.load(source / shard, weights_only=True).items():
            if name.endswith(INT4_LINEARS):
                state[name], state[name + "_scale"] = pack_int4_reference(tensor)
            else:
                state[name] = tensor
    torch.save(state, folder / "pytorch_model.bin")
    return folder

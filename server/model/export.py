"""`python -m server export DIR`: the converted model as a standard Hugging Face folder, loadable with no remote
code by `AutoModelForCausalLM` / `AutoTokenizer` (and so by engines built on them).

- weights: the float16 conversion (convert.py) cast to the asked dtype, in safetensors shards with an index,
  written tensor by tensor (never the whole model in memory);
- config.json for `GlmForCausalLM`, generation_config.json with the seed's sampling (top_p 0.7, temperature 1);
- a fast tokenizer (tokenizer.json) built from tokenizer.model: sentencepiece's BPE as a `tokenizers` BPE model
  whose merges follow the pieces' scores, with ChatGLM2's five special tokens at their ids. Its ids and decoding
  equal sentencepiece's (tests/test_export.py checks a broad corpus);
- a chat template that turns OpenAI-style messages into exactly the project's prompt, in the model's own format
  (CHAT_TEMPLATE for ChatGLM2, CHATGLM3_TEMPLATE with its role tokens for ChatGLM3, model/family.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .convert import ensure_converted
from .family import CHATGLM2, CHATGLM3, CHATGLM3_ROLES, detect_family
from .loader import DTYPES
from .tokenizer import EOS_ID, SPECIAL_TOKENS

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3

# OpenAI-style messages -> the ChatGLM2 prompt, as web/messages.to_rounds maps them: system (and developer)
# messages lead the first user turn; consecutive messages of one role are joined by a blank line; a final
# assistant message is the answer prefix; the prompt always ends ready for the answer.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=[], turns=[], history=[], pending=none) -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{%- set text = message.content -%}"
    "{%- else -%}{%- set text = message.content | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message.role in ['system', 'developer'] -%}{%- set ns.system = ns.system + [text] -%}"
    "{%- elif ns.turns and ns.turns[-1][0] == message.role -%}"
    "{%- set ns.turns = ns.turns[:-1] + [[message.role, ns.turns[-1][1] + '\\n\\n' + text]] -%}"
    "{%- else -%}{%- set ns.turns = ns.turns + [[message.role, text]] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set turns = ns.turns -%}"
    "{%- if turns[-1][0] == 'assistant' -%}{%- set prefix = turns[-1][1] -%}{%- set turns = turns[:-1] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- endif -%}"
    "{%- set query = turns[-1][1] -%}"
    "{%- for role, text in turns[:-1] -%}"
    "{%- if role == 'user' -%}{%- set ns.pending = text -%}"
    "{%- else -%}{%- set ns.history = ns.history + [[ns.pending or '', text]] -%}{%- set ns.pending = none -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set history = ns.history -%}"
    "{%- if ns.system -%}{%- set instructions = ns.system | join('\\n\\n') -%}"
    "{%- if history -%}{%- set history = [[instructions + '\\n\\n' + history[0][0], history[0][1]]] + history[1:] -%}"
    "{%- else -%}{%- set query = instructions + '\\n\\n' + query -%}{%- endif -%}"
    "{%- endif -%}"
    "{{- '[gMASK]sop' -}}"
    "{%- for q, a in history -%}"
    "{{- '[Round ' ~ loop.index ~ ']\\n\\n问：' ~ q ~ '\\n\\n答：' ~ a ~ '\\n\\n' -}}"
    "{%- endfor -%}"
    "{{- '[Round ' ~ (history | length + 1) ~ ']\\n\\n问：' ~ query ~ '\\n\\n答：' ~ prefix -}}"
)


# OpenAI-style messages -> the ChatGLM3 prompt, as web/messages.to_chat maps them without tools: the system (and
# developer) messages as one system message; consecutive user or assistant messages joined by a blank line; a
# tool message as an observation; a final assistant message is the prefill; a conversation that does not open
# with a user message gets an empty one (as a round without its question). ChatGLM3 encodes each message's text
# apart from its role line, so the text starts a new sentencepiece word: the space before it is that word's "▁".
CHATGLM3_TEMPLATE = (
    "{%- set ns = namespace(system=[], turns=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{%- set text = message.content -%}"
    "{%- else -%}{%- set text = message.content | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set role = 'observation' if message.role == 'tool' else message.role -%}"
    "{%- if role in ['system', 'developer'] -%}{%- set ns.system = ns.system + [text] -%}"
    "{%- elif ns.turns and ns.turns[-1][0] == role and role != 'observation' -%}"
    "{%- set ns.turns = ns.turns[:-1] + [[role, ns.turns[-1][1] + '\\n\\n' + text]] -%}"
    "{%- else -%}{%- set ns.turns = ns.turns + [[role, text]] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '[gMASK]sop' -}}"
    "{%- if ns.system -%}{{- '<|system|>\\n ' ~ (ns.system | join('\\n\\n')) -}}{%- endif -%}"
    "{%- set turns = ns.turns -%}"
    "{%- if turns[-1][0] == 'assistant' -%}{%- set prefix = turns[-1][1] -%}{%- set turns = turns[:-1] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- endif -%}"
    "{%- for role, text in turns -%}"
    "{%- if loop.first and role != 'user' -%}{{- '<|user|>\\n' -}}{%- endif -%}"
    "{{- '<|' ~ role ~ '|>\\n' ~ (' ' ~ text if text else '') -}}"
    "{%- endfor -%}"
    "{{- '<|assistant|>' -}}{%- if prefix -%}{{- '\\n ' ~ prefix -}}{%- endif -%}"
)


def export(model_dir: Path, out: Path, dtype: str = "float16", progress=None) -> Path:
    """Write the export folder `out` (created; it must not hold a model already)."""
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a model (config.json); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    converted = ensure_converted(Path(model_dir), "float16", progress)
    write_weights(converted, out, DTYPES[dtype])
    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = dtype
    write_json(out / "config.json", config)
    family = detect_family(Path(model_dir))
    tokenizer = write_tokenizer(Path(model_dir) / "tokenizer.model", out, config.get("max_position_embeddings"),
                                family)
    stops = [EOS_ID] + [tokenizer.token_to_id(r) for r in ("<|user|>", "<|observation|>")] \
        if family == CHATGLM3 else EOS_ID  # a ChatGLM3 reply also ends at the next turn's role
    write_json(out / "generation_config.json", {
        "eos_token_id": stops, "pad_token_id": config.get("pad_token_id", 0), "do_sample": True, "top_p": 0.7,
        "temperature": 1.0})
    log.info("exported to %s (%s)", out, dtype)
    return out


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_weights(converted: Path, out: Path, dtype: torch.dtype) -> None:
    """The converted tensors, cast, in shards of at most SHARD_BYTES, with model.safetensors.index.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = []  # (temporary path, tensor names): the final names need the count of shards
    current, size, total = {}, 0, 0

    def flush():
        path = out / f"part-{len(shards)}.safetensors.tmp"
        save_file(current, str(path), metadata={"format": "pt"})
        shards.append((path, list(current)))

    for source in sorted(converted.glob("model-*.safetensors")):
        with safe_open(str(source), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).to(dtype).contiguous()
                if current and size + tensor.nbytes > SHARD_BYTES:
                    flush()
                    current, size = {}, 0
                current[name] = tensor
                size += tensor.nbytes
                total += tensor.nbytes
    flush()
    weight_map = {}
    for i, (path, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def fast_tokenizer(model_file: Path, family: str = CHATGLM2):
    """tokenizer.model as a `tokenizers` Tokenizer with the same ids and the same decoding (and the family's
    special tokens at their ids)."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = sentencepiece.SentencePieceProcessor(model_proto=Path(model_file).read_bytes())
    probe = " Ａa  b\u3000c\t"
    if sp.normalize(probe) != "▁" + probe.replace(" ", "▁"):
        raise ValueError("this tokenizer.model normalizes text (ChatGLM2's does not); its export is not supported")
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = [sp.get_score(i) for i in range(n)]
    # sentencepiece's BPE joins the pair that forms the highest-scoring piece first: list every way a piece
    # splits into two pieces, ordered by its score
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        merges += [(scores[i], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                   for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                                     unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    specials = special_tokens(family)
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    assert [tokenizer.token_to_id(name) for name in specials] == list(range(n, n + len(specials)))
    return tokenizer, sp


def special_tokens(family: str) -> tuple[str, ...]:
    return SPECIAL_TOKENS + (CHATGLM3_ROLES if family == CHATGLM3 else ())


def write_tokenizer(model_file: Path, out: Path, max_length: int | None, family: str = CHATGLM2):
    tokenizer, sp = fast_tokenizer(model_file, family)
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATGLM3_TEMPLATE if family == CHATGLM3 else CHAT_TEMPLATE,
        "unk_token": sp.id_to_piece(sp.unk_id()), "eos_token": sp.id_to_piece(EOS_ID),
        "pad_token": sp.id_to_piece(sp.unk_id()), "additional_special_tokens": list(special_tokens(family)),
        "clean_up_tokenization_spaces": False, "model_max_length": max_length or 8192,
    })
    return tokenizer

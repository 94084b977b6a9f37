"""Convert a ChatGLM2 checkpoint (hub layout) into transformers' native GLM layout, once, cached as safetensors.

The conversion is a name table plus one real transform (splitting the fused query_key_value). It runs shard by
shard and tensor by tensor, so peak memory stays near one source shard. The result is written to a temporary
folder and renamed when complete: an interrupted conversion is never loaded. A fingerprint of the source files
decides when to convert again.

Formats: `float16` (converted/, what from_pretrained loads: GPU, bitsandbytes on the fly, 16-bit) and the CPU
formats, whose linear layers are already quantized (the rest bfloat16): `cpu-int4` / `cpu-int8` for torch's CPU
kernels, `cpu-nf4` in bitsandbytes' serialized 4-bit format (cpu_quant.py). A later start loads those as they
are: no quantizing at every load, and a 4-bit model reads ~3.8 GB instead of 12.5.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from tqdm import tqdm

from ..errors import ConversionError  # noqa: F401 (defined in errors.py, importable here too)
from . import packed_int4
from .checkpoint import CACHE_NAME, PACKED_INT4_SIZE, missing_files, weight_files
from .disk import free_bytes, has_room
from .packed_int4 import Int4Rows

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the output format changes: existing caches are then rebuilt
# the cache formats, with the size of each against the float16 source (about: for the disk check)
OUTPUT_SIZE = {"float16": 1.0, "float32": 2.0, "cpu-int8": 0.5, "cpu-int4": 0.32, "cpu-nf4": 0.32}
LINEAR_WEIGHT = re.compile(r"(_proj|lm_head)\.weight$")
Progress = Callable[[float], None]


# -- config ----------------------------------------------------------------------------------------------------
def glm_config(chatglm: dict) -> dict:
    """The GlmConfig fields for a ChatGLM2 config.json."""
    kv_channels = chatglm["kv_channels"]
    return {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "vocab_size": chatglm["padded_vocab_size"],
        "hidden_size": chatglm["hidden_size"],
        "intermediate_size": chatglm["ffn_hidden_size"],
        "num_hidden_layers": chatglm["num_layers"],
        "num_attention_heads": chatglm["num_attention_heads"],
        "num_key_value_heads": chatglm["multi_query_group_num"] if chatglm.get("multi_query_attention", True)
        else chatglm["num_attention_heads"],
        "head_dim": kv_channels,
        "rms_norm_eps": chatglm["layernorm_epsilon"],
        "attention_bias": chatglm.get("add_qkv_bias", True),
        "max_position_embeddings": chatglm["seq_length"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000 * chatglm.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        "hidden_act": "silu",
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


# -- tensor names ----------------------------------------------------------------------------------------------
def split_qkv(name: str, tensor: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
    """query_key_value rows are q, then k, then v: split them into the three projections."""
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    # clone: safetensors refuses to save views that share one storage
    q, k, v = (t.clone() for t in tensor.split([q_rows, kv_rows, kv_rows], dim=0))
    kind = name.rsplit(".", 1)[1]  # weight or bias
    prefix = name[: -len("query_key_value." + kind)]
    return {f"{prefix}q_proj.{kind}": q, f"{prefix}k_proj.{kind}": k, f"{prefix}v_proj.{kind}": v}


# ChatGLM2 name -> GLM name, None to drop, or a transform. Layer names are relative to the layer prefix.
GLOBAL_NAMES: dict[str, str | None] = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
    "transformer.rotary_pos_emb.inv_freq": None,  # recomputed from the config
}
LAYER_NAMES: dict[str, str | Callable] = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.query_key_value.weight": split_qkv,
    "self_attention.query_key_value.bias": split_qkv,
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # same [gate; up] row order
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
LAYER_PATTERN = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")


def convert_tensor(name: str, tensor: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
    if name in GLOBAL_NAMES:
        target = GLOBAL_NAMES[name]
        return {} if target is None else {target: tensor}
    match = LAYER_PATTERN.fullmatch(name)
    if not match or match.group(2) not in LAYER_NAMES:
        raise ConversionError(f"unexpected tensor {name!r} in the checkpoint")
    layer, rest = match.groups()
    target = LAYER_NAMES[rest]
    if callable(target):
        return target(f"model.layers.{layer}.self_attn.{rest.split('.', 1)[1]}", tensor, config)
    return {f"model.layers.{layer}.{target}": tensor}


def expected_names(config: dict) -> set[str]:
    """Every parameter name of the native model for this config, from a model on the meta device."""
    from transformers import GlmConfig, GlmForCausalLM

    with torch.device("meta"):
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        model = GlmForCausalLM(GlmConfig(**fields))
    return set(model.state_dict())


# -- source files ----------------------------------------------------------------------------------------------
SIZE_FIELDS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "kv_channels",
               "multi_query_group_num", "padded_vocab_size", "seq_length")


def read_config(path: Path) -> dict:
    """The ChatGLM2 config.json, or a ConversionError naming the file and what is wrong with it."""
    fix = "download it again (delete it and start: the first start fetches what is missing)"
    try:
        chatglm = json.loads(path.read_text(encoding="utf-8"))
        glm_config(chatglm)  # every field the conversion needs is there
        for key in SIZE_FIELDS:
            if isinstance(chatglm[key], bool) or not isinstance(chatglm[key], int) or chatglm[key] <= 0:
                raise TypeError(f"'{key}' must be a positive whole number, not {json.dumps(chatglm[key])[:30]}")
        return chatglm
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({str(exc)[:80]}): {fix}") from exc
    except KeyError as exc:
        raise ConversionError(f"{path} is not a ChatGLM2-6B config (it lacks {exc}): {fix}") from exc
    except (TypeError, AttributeError) as exc:
        raise ConversionError(f"{path} has a value of the wrong kind ({str(exc)[:80]}): {fix}") from exc


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one shard, one at a time; memory-mapped so the shard is not read into RAM at once."""
    if path.suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors' own error type
            raise ConversionError(f"{path.name} is not a safetensors file ({str(exc)[:80]}): it is damaged or "
                                  "incomplete; delete it and start again to download it again") from exc
        with f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's messages here speak of unsafe code, which misleads: say what it is
        raise ConversionError(f"{path.name} is not a PyTorch weight file that can be read: it is damaged or "
                              "incomplete; delete it and start again to download it again") from exc
    if not isinstance(state, dict):
        raise ConversionError(f"{path.name} holds no weight table; delete it and start again to download it again")
    for name in list(state):
        yield name, state.pop(name)


def fingerprint(model_dir: Path, fmt: str = "float16") -> dict:
    files = weight_files(model_dir) + [model_dir / "config.json"]
    stamp = {
        "converter": CONVERTER_VERSION,
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }
    if fmt != "float16":  # the int4 kernel's packed layout depends on torch and on the CPU's vector width
        stamp.update(format=fmt, torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability())
    if fmt == "cpu-nf4":
        from importlib.metadata import version

        stamp["bitsandbytes"] = version("bitsandbytes")
    return stamp


# -- the conversion --------------------------------------------------------------------------------------------
def cache_dir(model_dir: Path, fmt: str = "float16") -> Path:
    return model_dir / (CACHE_NAME if fmt == "float16" else f"{CACHE_NAME}-{fmt}")


def is_current(model_dir: Path, fmt: str = "float16") -> bool:
    stamp = cache_dir(model_dir, fmt) / "source.json"
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == fingerprint(model_dir, fmt)
    except (OSError, ValueError):
        return False


def ensure_converted(model_dir: Path, fmt: str = "float16", progress: Progress | None = None) -> Path:
    """The converted folder for `model_dir` in `fmt`, converting first when it is missing or stale."""
    model_dir = Path(model_dir)
    if not is_current(model_dir, fmt):
        convert(model_dir, fmt, progress)
    return cache_dir(model_dir, fmt)


def target_tensors(fmt: str) -> Callable[[str, torch.Tensor | Int4Rows], dict[str, torch.Tensor]]:
    """native name, source tensor (float16, or a packed int4 weight) -> what the cache of `fmt` stores for it."""
    if fmt in ("float16", "float32"):  # float16 keeps the source's dtype; float32 exists for packed sources
        return lambda name, tensor: {name: tensor.dense(tensor.scale.dtype if fmt == "float16" else torch.float32)
                                     if isinstance(tensor, Int4Rows) else tensor}
    from .cpu_quant import nf4_tensors, quantized_tensors

    if fmt == "cpu-nf4":  # as transformers quantizes: every linear layer but the output layer
        return lambda name, tensor: nf4_tensors(name, dense(tensor)) if LINEAR_WEIGHT.search(name) \
            and name != "lm_head.weight" else {name: tensor.to(torch.bfloat16)}
    bits = int(fmt.removeprefix("cpu-int"))

    def transform(name: str, tensor: torch.Tensor | Int4Rows) -> dict[str, torch.Tensor]:
        if isinstance(tensor, Int4Rows):
            return packed_int4.cpu_tensors(name, tensor, bits)
        if LINEAR_WEIGHT.search(name):  # the output layer keeps 8 bits (as llama.cpp keeps it above Q4)
            return quantized_tensors(name, tensor, 8 if name == "lm_head.weight" else bits)
        return {name: tensor.to(torch.bfloat16)}

    return transform


def dense(tensor: torch.Tensor | Int4Rows) -> torch.Tensor:
    return tensor.dense(torch.float32) if isinstance(tensor, Int4Rows) else tensor


def convert(model_dir: Path, fmt: str = "float16", progress: Progress | None = None) -> Path:
    missing = missing_files(model_dir)
    if missing:
        raise ConversionError(f"{model_dir} lacks {', '.join(missing)}")
    chatglm = read_config(model_dir / "config.json")
    config, packed = glm_config(chatglm), packed_int4.quantization_bits(chatglm) is not None
    files = weight_files(model_dir)
    float16_size = sum(f.stat().st_size for f in files) / (PACKED_INT4_SIZE if packed else 1)
    check_conversion_space(model_dir, int(float16_size * OUTPUT_SIZE[fmt]))

    target = cache_dir(model_dir, fmt)
    for stale in model_dir.glob(f".{target.name}.tmp-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = model_dir / f".{target.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise ConversionError(f"cannot write the converted copy into {model_dir} ({exc.strerror or exc}): move the "
                              "model to a folder you can write to and set model_dir (settings.ini) or --model-dir") \
            from exc
    log.info("converting %s to the native GLM layout (%s) in %s (once)", model_dir, fmt, target)
    try:
        native, weight_map = convert_shards(files, config, tmp, target_tensors(fmt), progress, packed)
        missing_names = expected_names(config) - native
        if missing_names:
            raise ConversionError(f"the checkpoint lacks tensors: {', '.join(sorted(missing_names)[:5])}")
        if fmt != "float16":
            config["torch_dtype"] = "bfloat16"
            config["cpu_quantization"] = fmt
        if fmt == "cpu-nf4":
            from .cpu_quant import NF4_CONFIG

            config["quantization_config"] = NF4_CONFIG
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "source.json").write_text(json.dumps(fingerprint(model_dir, fmt)), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_shards(files: list[Path], config: dict, out: Path, transform, progress: Progress | None = None,
                   packed: bool = False) -> tuple[set[str], dict[str, str]]:
    """Write one output shard per source shard; return the native names seen and the output's weight map.
    A packed int4 weight is converted once its scale has been read too."""
    pairing = packed_int4.Int4Pairing() if packed else None
    native: set[str] = set()
    weight_map: dict[str, str] = {}
    total = sum(f.stat().st_size for f in files)
    done = 0  # bytes of the source shards already converted
    with tqdm(total=total, unit="B", unit_scale=True, desc="Converting") as bar:
        for i, path in enumerate(files, start=1):
            shard_name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            shard: dict[str, torch.Tensor] = {}
            size, seen = path.stat().st_size, 0
            for name, tensor in read_tensors(path):
                for source_name, source in pairing.add(name, tensor) if pairing else [(name, tensor)]:
                    for native_name, native_tensor in convert_tensor(source_name, source, config).items():
                        native.add(native_name)
                        for new_name, new_tensor in transform(native_name, native_tensor).items():
                            shard[new_name] = new_tensor.contiguous()
                            weight_map[new_name] = shard_name
                seen = min(seen + tensor.numel() * tensor.element_size(), size)  # the file has a little more
                bar.update(done + seen - bar.n)
                if progress:
                    progress((done + seen) / total)
            done += size
            bar.update(done - bar.n)
            if progress:
                progress(done / total)
            if any(t.dtype in (torch.int8, torch.uint8) for t in shard.values()):
                save_aligned(shard, out / shard_name)
            else:
                save_file(shard, str(out / shard_name), metadata={"format": "pt"})
            del shard
    if pairing:
        pairing.check_complete()
    return native, weight_map


ALIGN = 64  # torch's CPU int8/int4 kernels read weights and scales with aligned vector loads


def save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file whose data starts on a 64-byte boundary (the header is padded through its metadata),
    so memory-mapped tensors whose sizes are multiples of 64 bytes stay aligned (model.py copies any other)."""
    pad = 0
    while True:
        data = save(tensors, metadata={"format": "pt", "align": " " * pad})
        misaligned = (8 + struct.unpack("<Q", data[:8])[0]) % ALIGN
        if not misaligned:
            path.write_bytes(data)
            return
        pad += ALIGN - misaligned


def check_conversion_space(model_dir: Path, needed: int) -> None:
    if not has_room(model_dir, needed):
        raise ConversionError(
            f"not enough disk space to convert the model: need {needed / 1e9:.1f} GB in {model_dir}, "
            f"{free_bytes(model_dir) / 1e9:.1f} GB free. Free some space and start again.")

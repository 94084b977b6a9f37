"""Load the converted checkpoint into transformers' native GlmForCausalLM at the plan's precision, and warm it up.

Nothing from the model folder is executed: the native class is used directly, and loading is strict. Two roads:
- from_pretrained on the float16 cache: 16-bit, and bitsandbytes 4/8-bit quantizing on the way (CUDA), or on the
  CPU's pre-quantized NF4 cache (bitsandbytes' CPU 4-bit kernel);
- the CPU cache already quantized for torch's int4/int8 kernels (cpu_quant.py): the model is built on the meta
  device, its linear layers swapped for the quantized ones, and the memory-mapped tensors assigned as they are.
Before the model is handed over, one short prompt runs through both the prefill and the decode path, so the
first request does not pay for one-time set-up (oneDNN kernels, allocations).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError  # noqa: F401 (defined in errors.py, importable here too)
from . import int8_gemm
from .attention import ATTENTION
from .checkpoint import source_bits
from .convert import ensure_converted
from .cpu_quant import DENSE_FROM_TOKENS, Int4Linear, Int8Linear, swap_linears
from .profiles import Plan
from .tokenizer import ChatGLM2Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# bitsandbytes warns on every 8-bit matmul that it casts bfloat16 inputs to float16: expected, and it floods logs.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
# On CPUs with AVX512-BF16 bitsandbytes tries to fetch an optional kernel from the hub and warns when it cannot;
# the built-in kernel it falls back to is the one bench/ measured, and the server never downloads code.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: ChatGLM2Tokenizer
    plan: Plan
    path: Path
    cpu_kernels: dict | None = None  # with torch's CPU kernels: which ran, and what cpu_kernels.py measured
    cpu_threads: dict | None = None  # on the CPU: how many threads compute, and why (cpu_threads.py)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def quantization_config(plan: Plan):
    if plan.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if plan.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=DTYPES[plan.dtype],
    )


def load_model(model_dir: Path, plan: Plan, progress: Callable[[float], None] | None = None) -> LoadedModel:
    """Convert once if needed (progress(fraction) while converting), load, check, warm up."""
    model_dir = Path(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    fmt = cache_format(plan, packed=source_bits(model_dir) is not None)
    converted = ensure_converted(model_dir, fmt, progress)
    kernels = None
    if fmt.startswith("cpu-int"):
        kernels = choose_cpu_kernels(plan, model_dir)
        model = load_cpu_quantized(converted, plan, kernels)
    else:
        model = load_pretrained(converted, plan, prequantized=fmt == "cpu-nf4")
    model.eval()
    model.set_attn_implementation(ATTENTION)  # (one decoding token on the CPU: attention.py)
    check_vocabulary(model, tokenizer)
    warm_up(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, plan=plan, path=model_dir, cpu_kernels=kernels)


def choose_cpu_kernels(plan: Plan, model_dir: Path) -> dict:
    """The int8 and int4 kernels (as asked, or the measured faster ones, the last start's int8 kernel while the
    figures allow it) and from how many prompt rows each precision expands its weights, from
    cpu_kernels.measure()."""
    from . import int4_vnni
    from .cpu_kernels import dense_from, measure, settled_int8

    measured = measure()
    int8 = plan.int8_kernel
    if int8 == "auto":  # (the last start's is kept for 8-bit only: at 4-bit no int8 kernel runs)
        int8 = settled_int8(measured, model_dir) if plan.bits == 8 else measured.int8
    if int8 != "torch" and not int8_gemm.activation_bits(int8):
        raise ModelLoadError(f"--cpu-kernels {int8}: its int8 GEMM is not exact on this CPU (its sums "
                             "saturate); use --cpu-kernels auto")
    int4 = measured.int4 if plan.int4_kernel == "auto" else plan.int4_kernel
    if int4 == "vnni" and not int4_vnni.available():
        raise ModelLoadError("--cpu-kernels vnni: the 4-bit VNNI kernel does not run here (it needs numba and a "
                             "CPU with AVX512-VNNI or AVX-VNNI); use --cpu-kernels auto")
    rows = dict(measured.dense_from_tokens)
    for bits, kernel, picked in ((8, int8, measured.int8), (4, int4, measured.int4)):
        if kernel != picked:  # another kernel than the pick: its threshold from the same figures
            rows[bits] = dense_from(bits, int8, int4, measured.prefill_ms, measured.dense_dtype)
    shown = {bits: None if n == sys.maxsize else n for bits, n in rows.items()}  # None: never
    return {"int8": int8, "int4": int4, "dense_dtype": measured.dense_dtype, "dense_from_tokens": shown,
            "measured": measured.as_dict()}


def cache_format(plan: Plan, packed: bool = False) -> str:
    """Which converted cache the plan loads (one of convert.OUTPUT_SIZE's formats). A packed int4 source in
    float32 gets a float32 cache: its exact weights (int4 x scale) do not fit in float16."""
    if plan.backend == "torch":
        return f"cpu-int{plan.bits}"
    if plan.backend == "bnb" and plan.device == "cpu" and plan.bits == 4 and plan.dtype == "bfloat16":
        return "cpu-nf4"
    return "float32" if packed and plan.bits == 16 and plan.dtype == "float32" else "float16"


def load_pretrained(converted: Path, plan: Plan, prequantized: bool = False):
    """from_pretrained on a converted cache; bitsandbytes quantizes on the way unless the cache already is."""
    from transformers import GlmForCausalLM

    log.info("loading %s on %s (%s): %s", converted, plan.device, plan.precision, plan.reason)
    model, info = GlmForCausalLM.from_pretrained(
        converted,
        dtype=DTYPES[plan.dtype],
        device_map={"": plan.device if plan.device == "cpu" else 0},
        quantization_config=None if prequantized else quantization_config(plan),
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ModelLoadError(f"the converted checkpoint does not match the model: {problems}; "
                             f"delete {converted} so it is converted again")
    return model


def load_cpu_quantized(converted: Path, plan: Plan, kernels: dict):
    """The pre-quantized CPU cache, memory-mapped shard by shard. With an int8 GEMM as the int8 kernel (FBGEMM's or
    oneDNN's), int8 layers are handed to it (a copy in its layout) as their shard loads, and int4 layers to the
    VNNI kernel alike where it runs them; a shard whose tensors
    all end up copied is closed again (unmapped), so what the process holds is the model once, not the model
    plus the mapped file."""
    from safetensors import safe_open
    from transformers import GlmConfig, GlmForCausalLM

    log.info("loading %s on the CPU (%s, torch's kernels): %s", converted, plan.precision, plan.reason)
    fields = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    config = GlmConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "architectures",
                                                                        "cpu_quantization")})
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    shards = sorted(converted.glob("model-*.safetensors"))
    names = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names |= set(f.keys())
    swap_linears(model, names)
    # int4 weights on torch's kernel are used where they lie in the mapped file; without them every tensor is
    # packed or copied
    int4 = kernels.get("int4", "torch")
    keep_mapped = int4 == "torch" and any(name.endswith(".weight_int4") for name in names)
    # the layers whose weights a kernel takes in its own layout ("torch": read where they lie)
    to_pack = {kind: kernel for kind, kernel in ((Int8Linear, kernels["int8"]), (Int4Linear, int4))
               if kernel != "torch"}
    files, unexpected = [], []
    for shard in shards:
        f = safe_open(str(shard), framework="pt")
        state = {name: aligned(f.get_tensor(name)) for name in f.keys()}
        if not keep_mapped:
            state = {name: t if name.endswith((".weight_int8", ".weight_int4")) else t.clone()
                     for name, t in state.items()}
        unexpected += model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        del state
        for kind, kernel in to_pack.items():
            pack_loaded([m for m in model.modules() if isinstance(m, kind)], kernel)
        unpacked = any(m.loaded() for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
        if keep_mapped or unpacked:
            files.append(f)  # tensors still live in the mapped file
    # buffers that are computed, not stored (the rotary frequencies), are still on the meta device: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or on_meta:
        raise ModelLoadError(f"the converted checkpoint does not match the model (not in the model: "
                             f"{', '.join(unexpected[:5]) or '-'}; not loaded: {', '.join(on_meta[:5]) or '-'}); "
                             f"delete {converted} so it is converted again")
    model.mapped_files = files  # closing them would unmap the weights under the model
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int8Linear)) and module.dense_from_tokens != sys.maxsize:
            rows = kernels["dense_from_tokens"][4 if isinstance(module, Int4Linear) else 8]
            module.dense_from_tokens = sys.maxsize if rows is None else rows
            module.dense_dtype = DTYPES[kernels["dense_dtype"]]
    return model


def pack_loaded(layers, kernel: str) -> None:
    """Pack the layers whose weights have loaded. FBGEMM's packing is single-threaded (~0.3 s for a 56 M-weight
    matrix) and releases the GIL: as many layers at once as torch computes with; the VNNI kernel's repacking
    uses those threads itself (~0.06 s for that matrix), one layer at a time."""
    from concurrent.futures import ThreadPoolExecutor

    ready = [layer for layer in layers if layer.loaded()]
    with ThreadPoolExecutor(1 if kernel == "vnni" else max(1, torch.get_num_threads())) as pool:
        list(pool.map(lambda layer: layer.pack(kernel), ready))


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when 64-byte aligned (convert.save_aligned sees to it), else an aligned copy: torch's CPU
    int8/int4 kernels read with aligned vector loads and crash otherwise."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def warm_up(model, tokenizer: ChatGLM2Tokenizer) -> None:
    """Run a prompt long enough for the prefill path, then one decode step (one-time set-up happens here)."""
    from transformers import DynamicCache

    from .forward import decode_one_token, prefill

    length = min(DENSE_FROM_TOKENS.values())  # a short prompt; with AMX also the expanded (dense) path
    ids = (tokenizer.prompt_prefix() + tokenizer.sp.encode("你好 hello " * length))[:length]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        token = int(prefill(model, ids, cache).argmax())
        decode_one_token(model, token, cache)


def check_vocabulary(model, tokenizer: ChatGLM2Tokenizer) -> None:
    vocab = model.config.vocab_size
    if vocab < tokenizer.first_special_id + 5:
        raise ModelLoadError(f"tokenizer.model has {tokenizer.n_pieces} pieces, too many for the model's "
                             f"vocabulary of {vocab}: the two do not belong together")

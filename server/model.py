"""Load the converted checkpoint into transformers' native GlmForCausalLM at the plan's precision.

Nothing from the model folder is executed: the native class is used directly, and loading is strict.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .convert import ensure_converted
from .profiles import Plan
from .tokenizer import ChatGLM2Tokenizer

log = logging.getLogger(__name__)

# bitsandbytes warns on every 8-bit matmul that it casts bfloat16 inputs to float16: expected, and it floods logs.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
# On CPUs with AVX512-BF16 bitsandbytes tries to fetch an optional kernel from the hub and warns when it cannot;
# the built-in kernel it falls back to is the one bench/ measured, and the server never downloads code.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: ChatGLM2Tokenizer
    plan: Plan
    path: Path

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


def load_model(model_dir: Path, plan: Plan) -> LoadedModel:
    from transformers import GlmForCausalLM

    model_dir = Path(model_dir)
    tokenizer = ChatGLM2Tokenizer(model_dir / "tokenizer.model")
    converted = ensure_converted(model_dir)
    log.info("loading %s on %s (%s): %s", converted, plan.device, plan.precision, plan.reason)
    model, info = GlmForCausalLM.from_pretrained(
        converted,
        dtype=DTYPES[plan.dtype],
        device_map={"": plan.device if plan.device == "cpu" else 0},
        quantization_config=quantization_config(plan),
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ModelLoadError(f"the converted checkpoint does not match the model: {problems}; "
                             f"delete {converted} so it is converted again")
    model.eval()
    check_vocabulary(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, plan=plan, path=model_dir)


def check_vocabulary(model, tokenizer: ChatGLM2Tokenizer) -> None:
    vocab = model.config.vocab_size
    if vocab < tokenizer.first_special_id + 5:
        raise ModelLoadError(f"tokenizer.model has {tokenizer.n_pieces} pieces, too many for the model's "
                             f"vocabulary of {vocab}: the two do not belong together")

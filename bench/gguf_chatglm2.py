"""GGUF files of a ChatGLM2 checkpoint for bench_cpu.py's llama.cpp comparison, without any remote code.

    python bench/gguf_chatglm2.py --llama-cpp DIR --model /data/bench-full --out /data/gguf

DIR is llama.cpp's source tree (for example vendor/llama.cpp inside the llama-cpp-python sdist). Its
convert_hf_to_gguf.py maps ChatGLM2 to llama.cpp's `chatglm` architecture, but its vocabulary step loads the hub's
remote tokenizer code (AutoTokenizer with trust_remote_code). Here that one step reads tokenizer.model with
sentencepiece instead: the pieces with their scores and kinds, then [MASK] [gMASK] [sMASK] sop eop as control
tokens, then padding up to padded_vocab_size. The rest of the conversion is llama.cpp's own. The float16 GGUF is
then quantized to Q4_0 and Q8_0 with llama-cpp-python's llama_model_quantize (2 threads).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
FTYPES = {"Q4_0": 2, "Q8_0": 7}  # llama_ftype values


def sentencepiece_vocab(self) -> None:
    """ChatGLMModel.set_vocab for ChatGLM2, from tokenizer.model (replaces the remote-code tokenizer)."""
    import gguf
    import sentencepiece
    from conversion.base import SentencePieceTokenTypes as Kind

    sp = sentencepiece.SentencePieceProcessor(model_proto=(self.dir_model / "tokenizer.model").read_bytes())
    vocab_size = self.hparams["padded_vocab_size"]
    tokens, scores, kinds = [], [], []
    for token_id in range(vocab_size):
        if token_id < sp.get_piece_size():
            tokens.append(sp.id_to_piece(token_id).encode("utf-8"))
            scores.append(sp.get_score(token_id))
            kinds.append(Kind.UNKNOWN if sp.is_unknown(token_id) else Kind.CONTROL if sp.is_control(token_id)
                         else Kind.BYTE if sp.is_byte(token_id) else Kind.NORMAL)
        elif token_id - sp.get_piece_size() < len(SPECIAL_TOKENS):
            tokens.append(SPECIAL_TOKENS[token_id - sp.get_piece_size()].encode())
            scores.append(0.0)
            kinds.append(Kind.CONTROL)
        else:
            tokens.append(f"[PAD{token_id}]".encode())
            scores.append(0.0)
            kinds.append(Kind.UNUSED)
    self.gguf_writer.add_tokenizer_model("llama")
    self.gguf_writer.add_tokenizer_pre("chatglm-spm")
    self.gguf_writer.add_token_list(tokens)
    self.gguf_writer.add_token_scores(scores)
    self.gguf_writer.add_token_types(kinds)
    self.gguf_writer.add_eos_token_id(2)
    self.gguf_writer.add_unk_token_id(0)
    assert isinstance(self.gguf_writer, gguf.GGUFWriter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source tree")
    parser.add_argument("--model", type=Path, required=True, help="the ChatGLM2 checkpoint (hub layout)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--types", default="Q4_0,Q8_0", help="quantized files to make from the 16/32-bit one "
                                                                 "('' for none: then llama_cpp is not needed)")
    parser.add_argument("--outtype", default="f16", choices=("f16", "f32"))
    parser.add_argument("--llama-quantize", type=Path, help="llama.cpp's llama-quantize (else llama_cpp's API)")
    args = parser.parse_args()
    sys.path[:0] = [str(args.llama_cpp), str(args.llama_cpp / "gguf-py")]
    import convert_hf_to_gguf
    from conversion import chatglm

    chatglm.ChatGLMModel.set_vocab = sentencepiece_vocab
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"chatglm2-{args.outtype}.gguf"
    if not f16.exists():
        sys.argv = ["convert_hf_to_gguf.py", str(args.model), "--outtype", args.outtype, "--outfile", str(f16)]
        convert_hf_to_gguf.main()
    print(f16)
    types = [name for name in args.types.split(",") if name]
    if types and not args.llama_quantize:
        import llama_cpp

    for name in types:
        target = args.out / f"chatglm2-{name}.gguf"
        if target.exists():
            continue
        if args.llama_quantize:
            subprocess.run([str(args.llama_quantize), str(f16), str(target), name, "2"], check=True)
            print(target)
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[name]
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(target).encode(), params) != 0:
            raise SystemExit(f"quantizing to {name} failed")
        print(target)


if __name__ == "__main__":
    main()

"""The full-size quantized model on the CPU as the server loads it, for the benches that time pieces of it
(bench_short_prompt.py, profile_cpu_decode.py): their common options and the load."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, required=True, help="bench_cpu.py's checkpoint")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--int8", choices=("auto", "torch", "fbgemm", "onednn"), default="auto",
                        help="the int8 kernel (auto: what the start-up measurement picks)")


def load(args: argparse.Namespace):
    from server.model.loader import load_model
    from server.model.profiles import Plan

    plan = Plan("cpu", args.bits, "bfloat16", 8192, "bench", "bench", backend="torch", int8_kernel=args.int8)
    loaded = load_model(args.dir, plan)
    print("kernels:", {k: v for k, v in loaded.cpu_kernels.items() if k != "measured"}, flush=True)
    return loaded

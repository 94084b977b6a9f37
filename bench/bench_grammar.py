"""What constrained decoding and logprobs add per token, on ChatGLM2's vocabulary of 65,024 ids.

    python bench/bench_grammar.py                 # the real tokenizer from ../shared when present
    python bench/bench_grammar.py --tokens 400

A reply under a JSON schema is decoded without a model: each step takes random logits, applies the grammar's
mask (engine/grammar.py: llguidance's bitmask -> -inf), picks the most likely allowed id and feeds it back,
as the engine does per row. Batch 4 runs four such rows one after another, as the engine's step does. The
reference in the same run is the output layer alone (4096 x 65024, one token), a lower bound of a decode
step (the full model's step is ~28x more work: docs/performance.md has measured steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import REAL_TOKENIZER  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "admin": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "city", "北京"]}, "maxItems": 6},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                      "pattern": "^[0-9]{5}$"}}}},
    "required": ["name", "admin", "tags", "address"]}
VOCAB = 65024


def tokenizer():
    from server.model.tokenizer import ChatGLM2Tokenizer

    if REAL_TOKENIZER.exists():
        return ChatGLM2Tokenizer(REAL_TOKENIZER), "the real ChatGLM2 tokenizer"
    from tests.checkpoint_factory import train_tokenizer

    path = Path("/tmp/bench-grammar-tokenizer.model")
    if not path.exists():
        train_tokenizer(path, vocab_size=400, seed=0)
    return ChatGLM2Tokenizer(path), "a 400-piece test tokenizer (../shared has no real one)"


def constrained_rows(tok, rows: int, tokens: int) -> tuple[float, int]:
    """ms per token of mask + accept over `rows` rows decoded together; tokens decoded per row."""
    from server.engine.grammar import Constraint, json_schema_grammar

    grammar = json_schema_grammar(SCHEMA)
    generator = torch.Generator().manual_seed(0)
    constraints = [Constraint(grammar, tok, VOCAB) for _ in range(rows)]
    spent, steps = 0.0, 0
    for _ in range(tokens):
        live = [c for c in constraints if not c.complete]
        if not live:
            break
        logits = torch.randn(len(live), VOCAB, generator=generator)
        start = time.perf_counter()
        for row, constraint in enumerate(live):
            token = int(constraint.apply(logits[row]).argmax())
            if token == tok.eos_id:
                constraint.matcher.consume_token(token)
                continue
            constraint.accept(token)
        spent += time.perf_counter() - start
        steps += 1
    return spent / max(steps, 1) * 1000, steps


def logprobs_cost(rows: int, repeats: int = 50) -> float:
    """ms per step of scoring `rows` rows with the top 5 alternatives."""
    from server.engine.logprobs import scored

    logits, mask = torch.randn(rows, VOCAB), torch.zeros(VOCAB)
    start = time.perf_counter()
    for _ in range(repeats):
        for row in range(rows):
            scored(logits[row], 7, 5, mask)
    return (time.perf_counter() - start) / repeats * 1000


def output_layer_ms(repeats: int = 20) -> float:
    weight, hidden = torch.randn(VOCAB, 4096, dtype=torch.bfloat16), torch.randn(1, 4096, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hidden @ weight.T
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    tok, which = tokenizer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {which}")
    start = time.perf_counter()
    from server.engine.grammar import guidance_tokenizer

    guidance_tokenizer(tok, VOCAB)
    print(f"vocabulary handed to llguidance once: {(time.perf_counter() - start) * 1000:.0f} ms")
    reference = output_layer_ms()
    print(f"reference: the output layer alone, one token, bfloat16: {reference:.2f} ms")
    print("| rows | grammar ms/step (mask + accept, all rows) | ÷ output layer | logprobs top 5 ms/step | ÷ output layer |")
    print("|---|---|---|---|---|")
    for rows in (1, 4):
        grammar_ms, steps = constrained_rows(tok, rows, args.tokens)
        logprob_ms = logprobs_cost(rows)
        print(f"| {rows} | {grammar_ms:.3f} ({steps} steps) | {grammar_ms / reference:.2f} | {logprob_ms:.3f} | "
              f"{logprob_ms / reference:.2f} |")


if __name__ == "__main__":
    main()

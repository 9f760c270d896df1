"""Perplexity of the unquantized (dequantized float) model on the Shakespeare evaluation plays.

The reference number every quantized model is compared with. Protocol: the four held-out
plays (Hamlet, Macbeth, Othello, Lear) joined with blank lines, tokenized without special
tokens, the first 32 non-overlapping windows of 512 tokens, each after a BOS that is
context only; perplexity = exp(mean token NLL). Expected for SmolLM2-135M-Instruct
(Q4_1 GGUF dequantized to float32): 40.95.

    python benchmarks/float_ppl.py                   # default model, default cache
    python benchmarks/float_ppl.py --cache-dir /tmp/fresh   # time a first (uncached) load
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from llm_adapter import DEFAULT_MODEL, evaluation_windows, load_model, load_text, perplexity


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, .gguf file, directory or hub id")
    parser.add_argument("--corpus", default="shakespeare", help="corpus name or text file (evaluation split)")
    parser.add_argument("--n-windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", default=None, help="dequantized-model cache (default $BILS_CACHE, ...)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    text = load_text(args.corpus, split="evaluation")
    windows = evaluation_windows(tokenizer, text, n_windows=args.n_windows, seqlen=args.seqlen)
    data_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = perplexity(model, windows, batch_size=args.batch_size)
    eval_s = time.perf_counter() - t0

    record = {
        "model": args.model,
        "corpus": args.corpus,
        "windows": list(windows.shape),
        "bos_token_id": tokenizer.bos_token_id,
        "ppl": result.ppl,
        "nll": result.nll,
        "n_tokens": result.n_tokens,
        "load_s": round(load_s, 2),
        "data_s": round(data_s, 2),
        "eval_s": round(eval_s, 2),
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"{args.model} on {args.corpus} ({args.n_windows} x {args.seqlen} tokens + BOS): "
        f"perplexity {result.ppl:.4f} (mean NLL {result.nll:.5f} over {result.n_tokens} tokens)\n"
        f"load {load_s:.1f} s, windows {data_s:.1f} s, evaluation {eval_s:.1f} s"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()

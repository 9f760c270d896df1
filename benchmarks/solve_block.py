"""Probe (issue #18): CPU milliseconds of ``quantize_weight`` for the seven layers of one
SmolLM2 block (gptq W3 g128 by default), the fastest of `--repeats` calls per layer.

The Hessians are random and correlated with SmolLM2's shapes
(:func:`dask_scaling.random_layer`); the solve time depends on the shapes, not the values.
CPU time (``time.process_time``), so that a loaded machine still compares two versions; run
it with one BLAS and one numba thread to count work rather than overlap::

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/solve_block.py
    python benchmarks/solve_block.py --method ojbkq --profile   # + cProfile of one block

Prints one line: per-layer ms and the block's total.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from llm_adapter import QuantSpec, quantize_weight  # noqa: E402

#: (out_features, in_features) of SmolLM2-135M's block.
SMOLLM2_BLOCK = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                 "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def random_layer(out_f, in_f, seed, tokens=2048):
    """``(W, H)``: correlated activations with outlier channels (as ``dask_scaling.random_layer``)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_f, in_f // 4)) / np.sqrt(in_f // 4)
    X = mix @ rng.standard_normal((in_f // 4, tokens)) + 0.3 * rng.standard_normal((in_f, tokens))
    X *= rng.lognormal(0.0, 0.7, (in_f, 1))
    return (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32), X @ X.T / tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="gptq", choices=["gptq", "ojbkq", "regcal"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--profile", action="store_true", help="cProfile (CPU time) of one more block")
    args = ap.parse_args(argv)
    spec = QuantSpec(bits=3, group_size=128, method=args.method)
    layers = {n: random_layer(*s, seed=i) for i, (n, s) in enumerate(SMOLLM2_BLOCK.items())}
    parts, total = [], 0.0
    for name, (W, H) in layers.items():
        quantize_weight(W, H, None, spec, backend=args.backend, rng=0)  # compile / warm
        best = float("inf")
        for _ in range(args.repeats):
            c = time.process_time()
            quantize_weight(W, H, None, spec, backend=args.backend, rng=0)
            best = min(best, time.process_time() - c)
        total += best
        parts.append(f"{name.split('_')[0]} {best * 1e3:.0f}")
    print(f"{args.method}: " + " ".join(parts) + f" | block {total * 1e3:.0f} ms CPU", flush=True)
    if args.profile:
        pr = cProfile.Profile(time.process_time)
        pr.enable()
        for W, H in layers.values():
            quantize_weight(W, H, None, spec, backend=args.backend, rng=0)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()

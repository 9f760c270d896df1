"""The arithmetic floor of end-to-end quantization, as a multiple of one forward pass (issue #18).

A sequential calibration must, block by block, (a) run the decoder block over the
calibration tokens once per stream — the quantized stream for every method, and the float
stream too for the joint methods (ojbkq, regcal; glvq by default uses ``H`` only), whose target needs the float model's
inputs — and (b) form the statistics the solver reads: :math:`H = \\sum \\tilde x \\tilde x^\\top`
for every group of layers that share an input (BLAS ``ssyrk``: the upper triangle, ``n^2``
multiply-adds per token), and for the joint methods also
:math:`D = \\sum (x - \\tilde x)\\,\\tilde x^\\top` (a full product, ``2 n^2`` flops per token
counted as multiply + add, twice ``ssyrk``'s). Nothing else is free to leave out, so with
zero overhead and solves that take no time at all

.. math::

    \\text{ratio}_{gptq} \\ge 1 + t_H / t_{fwd}, \\qquad
    \\text{ratio}_{joint} \\ge 2 + (t_H + t_D) / t_{fwd},

where ``t_fwd`` is the time of one pass of the decoder blocks (the issue's yardstick) and
``t_H``, ``t_D`` the times of the statistics' products, all at the rates this machine
reaches on these shapes. This script measures them side by side on one batch of the
protocol's shape (8 windows x 512 tokens through one SmolLM2 block with its real
weights, the statistics of every layer group at the same batch), in interleaved rounds,
and reports the flop counts next to the times so the rates can be checked against the
float32 GEMM floor (``benchmarks/cpu_solvers.py``).

Usage::

    python benchmarks/e2e_floor.py --threads 2          # benchmarks/results/e2e_floor.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine_info, write_json_file  # noqa: E402
from llm_adapter.calibration.blocks import (find_blocks, first_block_inputs, layer_groups,  # noqa: E402
                                            linear_in_features, linear_weight, run_block, select_linears)
from llm_adapter.calibration.statistics import gram_update  # noqa: E402
from llm_adapter.models import load_model  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "e2e_floor.json"
#: The issue's targets (quantize wall time / one forward pass of the decoder).
TARGETS = {"gptq": 1.5, "ojbkq": 2.5, "regcal": 2.5, "glvq": 3.0}
#: Streams of decoder forward passes each method needs (joint methods: float + quantized).
STREAMS = {"gptq": 1, "ojbkq": 2, "regcal": 2, "glvq": 1}
#: Whether the method needs D (the joint target's cross term).
JOINT = {"gptq": False, "ojbkq": True, "regcal": True, "glvq": False}


def block_flops(block, groups, layers, tokens, seqlen, config):
    """Flops per block for `tokens` tokens in windows of `seqlen` (multiply-add = 2)."""
    linear = sum(2 * tokens * int(linear_weight(layers[n]).shape[0]) * linear_in_features(layers[n])
                 for g in groups for n in g)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    # causal attention: Q K^T and P V over the lower triangle, per window
    attention = 2 * 2 * heads * head_dim * (seqlen * (seqlen + 1) // 2) * (tokens // seqlen)
    widths = [linear_in_features(layers[g[0]]) for g in groups]
    H = sum(tokens * w * (w + 1) for w in widths)  # ssyrk: n(n+1)/2 multiply-adds per token
    D = sum(2 * tokens * w * w for w in widths)  # full product
    return {"linear": linear, "attention": attention, "forward": linear + attention, "H": H, "D": D,
            "group_widths": widths}


def measure(model, batch_windows=8, seqlen=512, rounds=5, settle=0.1):
    """Time one block's forward and the statistics' products on one batch, side by side.

    Returns the JSON payload (without machine facts): groups, flops, best seconds per stage
    over `rounds` interleaved rounds, rates, and the floor ratio of every method."""
    _, blocks = find_blocks(model)
    block = blocks[0]
    layers = select_linears(model)[0]
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (batch_windows, seqlen), generator=g)
    home = next(block.parameters()).device
    tokens = batch_windows * seqlen
    with torch.no_grad():
        (hidden, rest, kwargs), = first_block_inputs(model, blocks, windows, batch_windows, home)
        groups = layer_groups(block, layers, (hidden, rest, kwargs))
        flops = block_flops(block, groups, layers, tokens, seqlen, model.config)
        xs = [torch.randn(tokens, w, generator=g) for w in flops["group_widths"]]
        xf = [x + 0.01 * torch.randn(x.shape, generator=g) for x in xs]
        scratch = [np.zeros((w, w), np.float32, order="F") for w in flops["group_widths"]]

        def forward():
            run_block(block, hidden, rest, kwargs)

        def stat_h():
            for x, s in zip(xs, scratch):
                gram_update(x, s)

        def stat_d():
            for x, f in zip(xs, xf):
                (f - x).T @ x

        stages = {"forward": forward, "H": stat_h, "D": stat_d}
        for fn in stages.values():  # warm-up
            fn()
        times = {k: [] for k in stages}
        for _ in range(rounds):
            for k, fn in stages.items():
                time.sleep(settle)
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    gflops = {k: flops[k] / best[k] / 1e9 for k in ("forward", "H", "D")}
    floors = {}
    for m in TARGETS:
        stat = best["H"] + (best["D"] if JOINT[m] else 0.0)
        floors[m] = {"streams": STREAMS[m], "statistics_over_forward": stat / best["forward"],
                     "floor_ratio": STREAMS[m] + stat / best["forward"],
                     "flop_floor_ratio": STREAMS[m] + (flops["H"] + (flops["D"] if JOINT[m] else 0))
                     / flops["forward"],
                     "target": TARGETS[m]}
        floors[m]["target_reachable"] = floors[m]["floor_ratio"] <= TARGETS[m]
    return {"threads": torch.get_num_threads(), "batch": {"windows": batch_windows, "seqlen": seqlen,
                                                         "tokens": tokens},
            "groups": groups, "flops_per_batch": flops, "seconds_per_batch": best, "rounds_s": times,
            "gflops": gflops, "floors": floors}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-windows", type=int, default=8, help="windows per batch (the protocol's 8)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    la = list(os.getloadavg())
    data = measure(model, args.batch_windows, args.seqlen, args.rounds)
    data.update(machine=machine_info(), model=args.model, load_average=[la, list(os.getloadavg())],
                command="python benchmarks/e2e_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    flops, best, gflops, floors = data["flops_per_batch"], data["seconds_per_batch"], data["gflops"], data["floors"]
    print(f"one block, {data['batch']['tokens']} tokens ({args.batch_windows} x {args.seqlen}), "
          f"{data['threads']} threads, load {la}")
    print(f"{'stage':<10}{'GFLOP':>9}{'s':>9}{'GFLOP/s':>9}")
    for k in ("forward", "H", "D"):
        print(f"{k:<10}{flops[k] / 1e9:9.1f}{best[k]:9.4f}{gflops[k]:9.1f}")
    print(f"\n{'method':<8}{'streams':>8}{'stats/fwd':>10}{'floor':>8}{'flop floor':>11}{'target':>8}")
    for m, f in floors.items():
        print(f"{m:<8}{f['streams']:8d}{f['statistics_over_forward']:10.2f}{f['floor_ratio']:8.2f}"
              f"{f['flop_floor_ratio']:11.2f}{f['target']:8.2f}")
    write_json_file(args.out, data)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

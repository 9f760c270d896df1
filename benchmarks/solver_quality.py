"""Solver quality on random BILS problems: cost relative to the optimum, fraction optimal.

Problems: n in {16, 32, 64}; boxes of 4, 8, 16 levels ([0, L-1]); 256 RHS per problem;
well-conditioned R (diag in [1, 2], off-diagonal N(0, 0.3^2)) and ill-conditioned R
(the QR factor of a matrix with singular values log-spaced over two decades). Targets
y = R (x_true + e), x_true uniform in the box, e ~ N(0, 0.3^2) per coordinate, so
Babai is often but not always optimal. The optimum comes from ``bils.enumerate`` with
a node budget; rows where the budget ran out compare against the best point any
solver found ("ref = best known"), and the table says how many RHS were proven.

Usage: python benchmarks/solver_quality.py [--quick] [--rhs 256] [--backend auto]
Writes benchmarks/results/solver_quality.json and docs/solver_quality.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bils  # noqa: E402
from bils.klein import lls_tau  # noqa: E402
from _common import machine_info, markdown_table, write_json  # noqa: E402


TAU_FACTORS = (0.25, 0.5, 2.0, 4.0, 16.0)


def make_problem(n, levels, k, conditioning, seed):
    rng = np.random.default_rng(seed)
    if conditioning == "well":
        R = np.triu(rng.normal(0, 0.3, (n, n)), 1) + np.diag(rng.uniform(1, 2, n))
    else:
        U, _ = np.linalg.qr(rng.standard_normal((n, n)))
        V, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = U @ np.diag(np.logspace(0, -2, n)) @ V.T * 3.0
        _, R = np.linalg.qr(A)
        R = np.sign(np.diag(R))[:, None] * R
    x_true = rng.integers(0, levels, (n, k))
    Y = R @ (x_true + rng.normal(0, 0.3, (n, k)))
    return np.triu(R), Y


def solvers(ordering_ok=True):
    yield "babai", lambda p, be: bils.babai(p, backend=be)
    yield "klein S=8", lambda p, be: bils.klein(p, n_samples=8, rng=0, backend=be)
    yield "klein S=32", lambda p, be: bils.klein(p, n_samples=32, rng=0, backend=be)
    yield "kbest K=4", lambda p, be: bils.kbest(p, beam_width=4, backend=be)
    yield "kbest K=16", lambda p, be: bils.kbest(p, beam_width=16, backend=be)


def tau_summary(records):
    rows = []
    for f in (1.0,) + TAU_FACTORS:
        name = "klein S=32 [vblast]" if f == 1.0 else f"klein S=32 tau={f:g}xLLS [vblast]"
        vals = [r["mean_cost_over_ref"] for r in records if r["solver"] == name]
        opt = [r["frac_optimal"] for r in records if r["solver"] == name]
        if vals:
            rows.append([f"{f:g}", f"{np.mean(vals):.4f}", f"{np.mean(opt):.3f}", len(vals)])
    return markdown_table(["tau / LLS", "mean cost / ref", "mean frac = ref", "problems"], rows)


def run(args):
    sizes = [16, 32] if args.quick else [16, 32, 64]
    levels_list = [4, 16] if args.quick else [4, 8, 16]
    orderings = ["natural", "diag", "sqrd", "vblast", "chang_han"]
    if args.quick:
        orderings = ["natural", "vblast"]
    rows, records = [], []
    for cond in ("well", "ill"):
        for n in sizes:
            for levels in levels_list:
                R, Y = make_problem(n, levels, args.rhs, cond, seed=n * 100 + levels)
                base = bils.BILSProblem.from_triangular(R, Y, 0, levels - 1, ordering="vblast")
                t0 = time.perf_counter()
                ex = bils.enumerate(base, max_nodes=args.max_nodes, backend=args.backend)
                t_ex = time.perf_counter() - t0
                proven = ex.status == bils.Status.OPTIMAL
                results = {"enumerate": (ex.cost, t_ex)}
                for order in orderings:
                    if order == "chang_han" and n > 32:
                        continue
                    p = bils.BILSProblem.from_triangular(R, Y, 0, levels - 1, ordering=order)
                    for name, fn in solvers():
                        if order == "chang_han" and name != "babai":
                            continue  # per-RHS re-factorisation: Babai only (cost)
                        t0 = time.perf_counter()
                        res = fn(p, args.backend)
                        results[f"{name} [{order}]"] = (res.cost, time.perf_counter() - t0)
                # Klein temperature study: multiples of the Liu-Ling-Stehle rule
                pv = bils.BILSProblem.from_triangular(R, Y, 0, levels - 1, ordering="vblast")
                tau0 = float(lls_tau(pv.R, np.ones((1, 1)), 32)[0])
                for f in TAU_FACTORS:
                    t0 = time.perf_counter()
                    res = bils.klein(pv, n_samples=32, tau=tau0 * f, rng=0, backend=args.backend)
                    results[f"klein S=32 tau={f:g}xLLS [vblast]"] = (res.cost, time.perf_counter() - t0)
                ref = np.min(np.stack([c for c, _ in results.values()]), axis=0)
                for name, (cost, t) in results.items():
                    rel = float(np.mean(cost / np.maximum(ref, 1e-300)))
                    opt = float(np.mean(np.isclose(cost, ref, rtol=1e-9, atol=1e-12)))
                    rec = {"conditioning": cond, "n": n, "levels": levels, "solver": name,
                           "mean_cost_over_ref": rel, "frac_optimal": opt,
                           "proven_optimal_rhs": int(proven.sum()), "rhs": args.rhs,
                           "time_s": t}
                    records.append(rec)
                    rows.append([cond, n, levels, name, f"{rel:.4f}", f"{opt:.3f}",
                                 f"{int(proven.sum())}/{args.rhs}", f"{t:.3f}"])
                print(f"done {cond} n={n} L={levels} (enumerate proved {int(proven.sum())}/{args.rhs})",
                      flush=True)
    summary = tau_summary(records)
    print(summary)
    header = ["R", "n", "levels", "solver [ordering]", "cost / ref", "frac = ref",
              "ref proven", "time s"]
    table = markdown_table(header, rows)
    print(table)
    payload = {"machine": machine_info(), "backend": args.backend, "max_nodes": args.max_nodes,
               "records": records}
    write_json("solver_quality.json", payload)
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                       "solver_quality.md")
    with open(doc, "w") as f:
        f.write("# Solver quality on random BILS problems\n\n")
        f.write("Generated by `python benchmarks/solver_quality.py` "
                f"(backend `{args.backend}`, enumerate budget {args.max_nodes} nodes per RHS, "
                f"{args.rhs} RHS per problem). `ref` is the optimum where enumerate proved it, "
                "else the best point any solver found. `frac = ref`: fraction of RHS where the "
                "solver reached the reference cost.\n\n")
        f.write(__doc__.split("Usage:")[0].split("\n", 1)[1].strip() + "\n\n")
        f.write("## Klein temperature\n\nMean cost / ref of Klein S=32 (V-BLAST order) over "
                "all problems, by temperature as a multiple of the Liu-Ling-Stehle rule "
                "(1x = the default `tau=\"auto\"`):\n\n" + summary + "\n\n")
        f.write("## All results\n\n" + table + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rhs", type=int, default=256)
    ap.add_argument("--max-nodes", type=int, default=200_000)
    ap.add_argument("--backend", default="auto")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()

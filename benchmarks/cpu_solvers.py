"""CPU solver speed on LLM-layer-shaped problems: numba vs the numpy reference vs GPTQ (torch).

Question: how fast are the numba kernels on the problems GPTQ users solve, compared with
the numpy reference and with GPTQ's own loop on torch-CPU, and what do Klein, K-best and
exact enumeration cost relative to Babai?

Problems ("layer-shaped", built as GPTQ does): activations ``X`` (n, N) with correlated
and outlier channels, ``H = X Xᵀ``, damping ``0.01·mean(diag H)``, act-order
(``ordering="diag"``), weights ``W`` (k out × n in), static per-group (g = 128) asymmetric
min-max grid (4-bit; 3-bit for K-best) from ``W`` in original column order, then
``bils.BILSProblem.from_gram(H, W.T, 0, maxq, scale=S, offset=O, damp=0.01,
ordering="diag")`` with ``S, O`` of shape (n, k). Shapes n × k (in × out features):
576×576, 1536×576, 4096×4096, 11008×4096.

Baselines: ``benchmarks/_gptq_torch.py`` — (a) GPTQ's published ``fasterquant`` (act-order,
static groups, block 128, damp 0.01, float32 as published) and (b) a lean torch loop with a
precomputed grid, run in float32 (as GPTQ) and in float64 (the precision of bils, whose
products then cost the same flops). Their codes are checked against ``bils.babai`` (match
rate printed; float32 GPTQ differs from float64 Babai only where float32 rounding moves a
centre across a rounding boundary). ``bils.babai`` runs in both precisions
(``precision="float64"``, the default, and ``"float32"``); speed-ups compare equal
precisions. GPTQ's loops include their ``H⁻¹`` Cholesky steps, bils solve times exclude
``from_gram`` (Cholesky of ``H`` and ``R Wᵀ``), which is reported as "construct s".

Timings are wall-clock minima over ``--repeats`` runs after a warm-up (compilation is
reported separately, cold and from the on-disk cache, in fresh processes). Problem
construction is timed separately and not included in solver times. Peak memory of the
4096×4096 Babai call is measured with ``tracemalloc`` (numpy allocations; the kernels'
own scratch is a few tiles per thread).

Usage: python benchmarks/cpu_solvers.py [--quick] [--repeats 3] [--skip-compile]
Writes benchmarks/results/cpu_solvers.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bils  # noqa: E402
from _common import machine_info, markdown_table, write_json  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096)]
GROUP = 128
TARGETS = {
    "babai_4096_s": 2.0,
    "babai_vs_lean_speedup": 3.0,
    "klein8_over_babai": 8.0,
    "kbest8_over_babai": 10.0,
    "enum24_median_ms": 5.0,
    "peak_over_inputs": 3.0,
}


# --------------------------------------------------------------------------- problems
def activations(n, N, rng):
    """(n, N) activations: a low-rank correlated part, per-channel scales, outlier channels."""
    r = min(64, n)
    X = (rng.standard_normal((n, r)) / np.sqrt(r)) @ rng.standard_normal((r, N))
    X += 0.5 * rng.standard_normal((n, N))
    X *= np.exp(0.5 * rng.standard_normal((n, 1)))
    X[rng.choice(n, max(1, n // 128), replace=False)] *= 20.0
    return X


def minmax_grid(W, bits, group):
    """Static-group asymmetric min-max grid of ``W`` (k, n) as GPTQ's ``Quantizer``."""
    k, n = W.shape
    maxq = 2 ** bits - 1
    scale = np.empty((k, n))
    zero = np.empty((k, n))
    for g0 in range(0, n, group):
        blk = W[:, g0:g0 + group]
        xmin = np.minimum(blk.min(1), 0.0)
        xmax = np.maximum(blk.max(1), 0.0)
        both0 = (xmin == 0) & (xmax == 0)
        xmin[both0], xmax[both0] = -1.0, 1.0
        s = (xmax - xmin) / maxq
        scale[:, g0:g0 + group] = s[:, None]
        zero[:, g0:g0 + group] = np.round(-xmin / s)[:, None]
    return scale, zero


def layer_data(n, k, seed=0):
    """Hessian ``H`` (n, n) and weights ``W`` (k, n) of a layer, and their build time."""
    rng = np.random.default_rng(seed)
    N = min(max(n, 2048), 4096)
    t0 = time.perf_counter()
    X = activations(n, N, rng)
    H = X @ X.T
    del X
    W = 0.02 * rng.standard_normal((k, n))
    W[:, rng.choice(n, max(1, n // 256), replace=False)] *= 5.0  # a few salient inputs
    return H, W, N, time.perf_counter() - t0


def build_problem(H, W, bits):
    """``BILSProblem`` of the layer with GPTQ's static-group min-max grid of ``bits`` bits.

    Returns (problem, construction seconds, input bytes).
    """
    scale, zero = minmax_grid(W, bits, GROUP)
    t1 = time.perf_counter()
    S = np.ascontiguousarray(scale.T)
    O = np.ascontiguousarray(-(scale * zero).T)
    del scale, zero
    prob = bils.BILSProblem.from_gram(H, W.T, 0, 2 ** bits - 1, scale=S, offset=O, damp=0.01,
                                      ordering="diag")
    t2 = time.perf_counter()
    del S, O
    inputs = sum(int(np.asarray(a).nbytes) for a in (prob.R, prob.Y, prob.scale, prob.offset,
                                                     prob.lo, prob.hi))
    return prob, t2 - t1, inputs


# --------------------------------------------------------------------------- timing
CPU_TIMES = {}


def best_time(fn, repeats, label=None):
    """Minimum wall time of ``fn()`` over ``repeats`` runs; returns (seconds, last result).

    The process CPU time of the fastest run is kept in ``CPU_TIMES[label]`` (all threads;
    with a loaded machine it shows how much of the wall time was spent computing).
    """
    best, out, cpu = np.inf, None, np.nan
    for _ in range(repeats):
        gc.collect()
        c0 = time.process_time()
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        if dt < best:
            best, cpu = dt, time.process_time() - c0
    if label:
        CPU_TIMES[label] = cpu
    return best, out


def warm_up():
    """Compile (or load from cache) every numba kernel on a tiny problem."""
    rng = np.random.default_rng(0)
    R = np.triu(rng.standard_normal((6, 6))) * 0.2 + np.eye(6)
    Y = rng.standard_normal((6, 3))
    bils.babai(R, Y, 0, 3, backend="numba")
    bils.klein(R, Y, 0, 3, n_samples=2, rng=0, backend="numba")
    bils.kbest(R, Y, 0, 3, beam_width=2, backend="numba")
    bils.enumerate(R, Y, 0, 3, backend="numba")


_COMPILE_SNIPPET = r"""
import json, time
t0 = time.perf_counter()
import numpy as np, bils
rng = np.random.default_rng(0)
R = np.triu(rng.standard_normal((6, 6))) * 0.2 + np.eye(6)
Y = rng.standard_normal((6, 3))
out = {"import_s": time.perf_counter() - t0}
for name, f in [("babai", lambda: bils.babai(R, Y, 0, 3, backend="numba")),
                ("klein", lambda: bils.klein(R, Y, 0, 3, n_samples=2, rng=0, backend="numba")),
                ("kbest", lambda: bils.kbest(R, Y, 0, 3, beam_width=2, backend="numba")),
                ("enumerate", lambda: bils.enumerate(R, Y, 0, 3, backend="numba"))]:
    t = time.perf_counter(); f(); out[name] = time.perf_counter() - t
print(json.dumps(out))
"""


def compile_times():
    """First-call times in fresh processes: cold (empty cache dir), then from the cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=ROOT)
        res = {}
        for label in ("cold", "cached"):
            p = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET], env=env, cwd=ROOT,
                               capture_output=True, text=True, check=True)
            res[label] = json.loads(p.stdout.strip().splitlines()[-1])
    return res


# --------------------------------------------------------------------------- sections
def bench_shape(n, k, args, records, table):
    import torch
    from _gptq_torch import gptq_lean, gptq_original

    tag = f"{n}x{k}"
    big = n * n * k > 4096 ** 3
    reps = 1 if big else args.repeats
    H, W, N, t_build = layer_data(n, k, seed=n + k)
    rec = {"n": n, "k": k, "N": N, "build_s": t_build}

    # GPTQ on torch first (its float32 copies are freed before the bils problem is built)
    torch.set_num_threads(os.cpu_count() or 1)
    Wt, Ht = torch.from_numpy(W), torch.from_numpy(H)
    scale, zero = minmax_grid(W, 4, GROUP)
    sc, ze = torch.from_numpy(scale), torch.from_numpy(zero)
    codes, q = {}, None
    if big and not args.original_large:
        rec["gptq_original_s"] = None
    else:
        rec["gptq_original_s"], q = best_time(lambda: gptq_original(Wt, Ht), 1,
                                              f"{tag} gptq original")
        codes["gptq_original"] = q.numpy().T.copy()
    if big and args.skip_lean_large:
        rec["gptq_lean_s"] = None
    else:
        rec["gptq_lean_s"], q = best_time(lambda: gptq_lean(Wt, Ht, sc, ze),
                                          1 if big else min(2, reps), f"{tag} gptq lean")
        codes["gptq_lean"] = q.numpy().T.copy()
    if not big or not args.skip_lean_large:  # same loop in float64, the precision of bils
        rec["gptq_lean_f64_s"], q = best_time(
            lambda: gptq_lean(Wt, Ht, sc, ze, dtype=torch.float64), 1 if big else min(2, reps),
            f"{tag} gptq lean float64")
        codes["gptq_lean_f64"] = q.numpy().T.copy()
    if n * k <= 1536 * 576:  # code-for-code check in float64 (GPTQ's loop without float32 noise)
        codes["gptq_original_f64"] = gptq_original(Wt, Ht, dtype=torch.float64).numpy().T.copy()
    del Wt, Ht, sc, ze, scale, zero, q
    gc.collect()

    prob, rec["construct_s"], rec["input_bytes"] = build_problem(H, W, 4)
    if big:
        del H, W
        gc.collect()
    t_nb, res_nb = best_time(lambda: bils.babai(prob, backend="numba"), reps, f"{tag} babai numba")
    rec["babai_numba_s"] = t_nb
    x_nb = res_nb.x
    t32, r32 = best_time(lambda: bils.babai(prob, precision="float32", backend="numba"), reps,
                         f"{tag} babai numba float32")
    rec["babai_numba_f32_s"] = t32
    rec["f32_code_match"] = float(np.mean(r32.x == x_nb))
    for name, q in codes.items():
        rec[f"{name}_match"] = float(np.mean(q == x_nb))
        rec[f"{name}_match_f32"] = float(np.mean(q == r32.x))
    del codes, r32
    if n * k >= 4096 * 4096:  # for information: larger lazy-batch blocks, fewer products
        rec["babai_numba_block512_s"], r512 = best_time(
            lambda: bils.babai(prob, block_size=512, backend="numba"), reps,
            f"{tag} babai numba block_size=512")
        rec["block512_code_match"] = float(np.mean(r512.x == x_nb))
        del r512
    if big and not args.numpy_large:
        rec["babai_numpy_s"] = None
    else:
        t_np, res_np = best_time(lambda: bils.babai(prob, backend="numpy"), 1, f"{tag} babai numpy")
        rec["babai_numpy_s"] = t_np
        rec["numpy_code_match"] = float(np.mean(res_np.x == x_nb))
        rec["numpy_cost_rel_diff"] = float(np.max(np.abs(res_np.cost - res_nb.cost)
                                                  / np.maximum(np.abs(res_np.cost), 1e-300)))
        del res_np
    del res_nb, x_nb

    if n == 4096 and k == 4096:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        r = bils.babai(prob, backend="numba")
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        del r
        rec["babai_peak_extra_bytes"] = peak
        rec["babai_peak_over_inputs"] = (peak + rec["input_bytes"]) / rec["input_bytes"]

    if not big and not args.skip_klein:
        rec["klein8_numba_s"], _ = best_time(
            lambda: bils.klein(prob, n_samples=8, rng=0, backend="numba"), min(2, reps),
            f"{tag} klein8 numba")
        del prob
        gc.collect()
        p3, _, _ = build_problem(H, W, 3)
        rec["babai3_numba_s"], _ = best_time(lambda: bils.babai(p3, backend="numba"), reps,
                                             f"{tag} babai3 numba")
        rec["kbest8_3bit_numba_s"], _ = best_time(
            lambda: bils.kbest(p3, beam_width=8, backend="numba"), min(2, reps),
            f"{tag} kbest8 3-bit numba")
        del p3
    records.append(rec)
    fmt = lambda v: "skipped" if v is None else f"{v:.3f}"  # noqa: E731
    ratio = lambda key, b="babai_numba_s": (f"{rec[key] / rec[b]:.1f}x"  # noqa: E731
                                            if rec.get(key) else "-")
    pct = lambda key: f"{100 * rec[key]:.2f}%" if key in rec else "-"  # noqa: E731
    table.append([tag, f"{rec['construct_s']:.2f}", fmt(rec["babai_numba_s"]),
                  fmt(rec["babai_numba_f32_s"]),
                  fmt(rec["babai_numpy_s"]), fmt(rec["gptq_original_s"]), fmt(rec["gptq_lean_s"]),
                  fmt(rec.get("gptq_lean_f64_s")), ratio("gptq_lean_s", "babai_numba_f32_s"),
                  ratio("gptq_lean_f64_s"),
                  pct("gptq_original_f64_match"), pct("gptq_original_match"),
                  pct("gptq_lean_match"),
                  fmt(rec.get("klein8_numba_s")), fmt(rec.get("kbest8_3bit_numba_s"))])
    print(markdown_table(HEADER, [table[-1]]), flush=True)
    gc.collect()


HEADER = ["shape (in x out)", "construct s", "babai numba s", "babai numba f32 s", "babai numpy s",
          "GPTQ orig f32 s", "GPTQ lean f32 s", "GPTQ lean f64 s", "lean f32 / numba f32",
          "lean f64 / numba", "codes = GPTQ f64", "codes = GPTQ f32", "codes = lean f32",
          "klein S=8 s", "kbest K=8 3-bit s"]


def bench_enumerate(args):
    out = {}
    rng = np.random.default_rng(24)
    for n, k, budget in ((24, args.enum_rhs, None), (40, args.enum_rhs, 200_000)):
        R = np.triu(rng.normal(0, 0.3, (n, n)), 1) + np.diag(rng.uniform(1, 2, n))
        x_true = rng.integers(0, 16, (n, k))
        Y = R @ (x_true + rng.normal(0, 0.3, (n, k)))
        per = []
        for j in range(k):
            t = time.perf_counter()
            bils.enumerate(R, Y[:, j], 0, 15, max_nodes=budget, backend="numba")
            per.append(time.perf_counter() - t)
        t_all, res = best_time(lambda: bils.enumerate(R, Y, 0, 15, max_nodes=budget,
                                                      backend="numba"), 1)
        rec = {"n": n, "k": k, "max_nodes": budget, "median_ms_per_rhs": 1e3 * float(np.median(per)),
               "max_ms_per_rhs": 1e3 * float(np.max(per)), "batch_s": t_all,
               "proved_optimal": int(np.sum(res.status == bils.Status.OPTIMAL)),
               "median_nodes": float(np.median(res.info["nodes"]))}
        if n == 24:
            sub = min(k, 8)
            t_np = time.perf_counter()
            rn = bils.enumerate(R, Y[:, :sub], 0, 15, backend="numpy")
            rec["numpy_ms_per_rhs"] = 1e3 * (time.perf_counter() - t_np) / sub
            rec["numpy_cost_equal"] = bool(np.allclose(rn.cost, res.cost[:sub], rtol=1e-12))
        out[f"n{n}"] = rec
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=None, help="e.g. 576x576,4096x4096")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-klein", action="store_true")
    ap.add_argument("--numpy-large", action="store_true", help="run the numpy reference at 11008x4096")
    ap.add_argument("--original-large", action="store_true", help="run original GPTQ at 11008x4096")
    ap.add_argument("--skip-lean-large", action="store_true", help="skip lean GPTQ at 11008x4096")
    ap.add_argument("--enum-rhs", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    import numba

    payload = {"machine": machine_info(), "numba": numba.__version__,
               "numba_threads": numba.get_num_threads(), "targets": TARGETS,
               "loadavg_start": os.getloadavg()}
    if not args.skip_compile:
        payload["compile"] = compile_times()
        c = payload["compile"]
        print("compile (fresh process, s):",
              {k: round(v, 2) for k, v in c["cold"].items()}, "| from cache:",
              {k: round(v, 2) for k, v in c["cached"].items()}, flush=True)
    warm_up()
    records, table = [], []
    for n, k in shapes:
        bench_shape(n, k, args, records, table)
    payload["layers"] = records
    payload["enumerate"] = bench_enumerate(args)

    print()
    print(markdown_table(HEADER, table))
    e = payload["enumerate"]
    print(f"\nenumerate n=24 box [0,15]: median {e['n24']['median_ms_per_rhs']:.2f} ms/RHS "
          f"(max {e['n24']['max_ms_per_rhs']:.1f} ms, numpy {e['n24']['numpy_ms_per_rhs']:.1f} ms/RHS); "
          f"n=40 budget {e['n40']['max_nodes']}: {e['n40']['proved_optimal']}/{e['n40']['k']} "
          f"proved optimal (median {e['n40']['median_ms_per_rhs']:.2f} ms/RHS)")
    payload["checks"] = checks = evaluate_targets(records, e)
    payload["cpu_seconds"] = CPU_TIMES
    payload["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {payload['loadavg_start']}, at end {payload['loadavg_end']} "
          f"({os.cpu_count()} cores): other processes share the machine when these are high")
    print()
    print(markdown_table(["target", "limit", "measured", "met"],
                         [[c["name"], c["limit"], c["measured"],
                           "-" if c["met"] is None else "yes" if c["met"] else "NO"]
                          for c in checks]))
    if not args.no_write:
        path = write_json("cpu_solvers.json", payload)
        print(f"\nwrote {os.path.relpath(path, ROOT)}")
    return payload


def evaluate_targets(records, enum):
    checks = []
    by = {(r["n"], r["k"]): r for r in records}
    r = by.get((4096, 4096))
    if r:
        b = r["babai_numba_s"]
        checks.append({"name": "babai 4096x4096 (s)", "limit": "<= 2.0",
                       "measured": round(b, 3), "met": b <= 2.0})
        q64 = r["gptq_lean_f64_s"] / b
        checks.append({"name": "speed-up vs lean torch GPTQ loop, float64 (as bils)",
                       "limit": ">= 3x", "measured": round(q64, 2), "met": q64 >= 3})
        q32 = r["gptq_lean_s"] / r["babai_numba_f32_s"]
        checks.append({"name": "speed-up vs lean torch GPTQ loop, both float32 (GPTQ's precision)",
                       "limit": ">= 3x", "measured": round(q32, 2), "met": q32 >= 3})
        q = r["gptq_lean_s"] / b
        checks.append({"name": "for information: lean torch float32 / babai float64",
                       "limit": "-", "measured": round(q, 2), "met": None})
        if "klein8_numba_s" in r:
            q = r["klein8_numba_s"] / b
            checks.append({"name": "klein S=8 / babai", "limit": "<= 8",
                           "measured": round(q, 2), "met": q <= 8})
            q = r["kbest8_3bit_numba_s"] / r["babai3_numba_s"]
            checks.append({"name": "kbest K=8 (3-bit) / babai (3-bit)", "limit": "<= 10",
                           "measured": round(q, 2), "met": q <= 10})
        if "babai_peak_over_inputs" in r:
            q = r["babai_peak_over_inputs"]
            checks.append({"name": "babai 4096 peak memory / inputs", "limit": "<= 3",
                           "measured": round(q, 2), "met": q <= 3})
    m = enum["n24"]["median_ms_per_rhs"]
    checks.append({"name": "enumerate n=24 median ms/RHS", "limit": "<= 5",
                   "measured": round(m, 3), "met": m <= 5})
    return checks


if __name__ == "__main__":
    main()

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

Focused run (issue #23): ``python benchmarks/cpu_solvers.py --only babai4096
[--repeats N] [--focus-shape 4096x4096]``: the 4096x4096 4-bit g128 layer with its grid
passed grouped (``bils.GroupedGrid``) and as full (n, k) arrays, in three sections of N
interleaved rounds (every contender once per round, a ``SETTLE_S`` pause before each
call): (1) the float32/float64 product floor (``n² k`` flops at the speed of one BLAS
product), numba Babai in both precisions and both grid forms, the lean torch loop in both
precisions; (2) Babai float64 and Klein S=8; (3) Babai 3-bit and K-best K=8 3-bit.
Figures are best-of-N per contender; every round's wall and CPU seconds, the per-round
ratios (``round_ratios``) and the load average per round are stored beside them. Also:
per-phase timings of the numba Babai (every step of a ``bils.babai`` call: validation with
the fused passes, the precision's range check, grid handling, the sweep, result assembly,
the output check, reordering to the caller's order; their sum next to one plain call; the
former panel method's conversions, products and in-panel sweep for comparison), of Klein
(Babai sweep, conversions, samples, selection) and K-best (products, beam sweeps, wall and
CPU); layer loss against the loop's; numpy == numba codes. Writes
benchmarks/results/cpu_solvers_focus.json (``--focus-out NAME`` for another file).
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


# --------------------------------------------------------------------------- focused: 4096 layer
FOCUS_TARGETS = {
    "babai_f32_over_floor_grouped": 1.5,
    "babai_f32_over_floor_full": 2.0,
    "lean_over_babai_f32": 4.0,
    "lean_over_babai_f64": 4.0,
    "loss_rel_diff": 1e-3,
    "klein8_over_babai": 6.0,
    "kbest8_3bit_over_babai_3bit": 8.0,
}


def grouped_minmax_grid(W, bits, group):
    """Per-group (scale, zero), each (k, g), and the group map (n,) of :func:`minmax_grid`."""
    k, n = W.shape
    scale, zero = minmax_grid(W, bits, group)
    return scale[:, ::group].copy(), zero[:, ::group].copy(), np.arange(n) // group


def grouped_problem(H, W, bits, grouped):
    """The layer's problem with its grid passed grouped (``bils.GroupedGrid``) or as (n, k) arrays.

    Returns (problem, construction seconds, (scale, zero) per group, group map).
    """
    sg, zg, groups = grouped_minmax_grid(W, bits, GROUP)
    t0 = time.perf_counter()
    if grouped:
        S = bils.GroupedGrid(sg.T, groups)
        O = bils.GroupedGrid(-(sg * zg).T, groups)
    else:
        S = np.ascontiguousarray(sg[:, groups].T)
        O = np.ascontiguousarray(-(sg * zg)[:, groups].T)
    prob = bils.BILSProblem.from_gram(H, W.T, 0, 2 ** bits - 1, scale=S, offset=O, damp=0.01,
                                      ordering="diag")
    return prob, time.perf_counter() - t0, (sg, zg), groups


def layer_loss(W, H, codes, sg, zg, groups):
    """``sum((W - Q) H (W - Q)ᵀ)`` for codes (k, n) on the grouped grid (undamped ``H``)."""
    Q = sg[:, groups] * (codes - zg[:, groups])
    E = W - Q
    return float(np.sum((E @ H) * E))


def product_floor(n, k, dtype, rng):
    """Seconds of ``n² k`` flops at the speed of one BLAS ``(n, n) @ (n, k)`` product in ``dtype``.

    (The product has ``2 n² k`` flops; Babai's products amount to ``n² k``: its trailing
    triangle.) Returns (floor seconds, GFLOP/s, floor CPU seconds of all threads).
    """
    A = rng.standard_normal((n, n)).astype(dtype)
    B = rng.standard_normal((n, k)).astype(dtype)
    c = time.process_time()
    t = time.perf_counter()
    A @ B
    dt = time.perf_counter() - t
    return dt / 2, 2.0 * n * n * k / dt / 1e9, (time.process_time() - c) / 2


def babai_phases(prob, precision, panels=False):
    """Per-phase seconds of one numba Babai call, every step of ``bils.babai`` timed.

    ``validate`` (the problem's canonical arrays: the fused validation passes),
    ``precision_check`` (the working precision's range check, from validation's
    reductions), the kernel's phases (``assemble``, ``grid``, and ``sweep`` for the
    default whole-sweep method; ``panels=True``: the former panel method's ``convert``,
    ``product``, ``panel``), ``output_check`` (codes in the box, finite costs),
    ``reorder`` (codes back to the caller's order), ``sum`` of these and ``call`` (one
    ``bils.babai`` call right after, for comparison).
    """
    from bils._guard import check_output, fused_passes
    from bils._numba.babai import babai_kernel
    from bils.babai import _precision_iv

    phases = {}
    t0 = time.perf_counter()
    can = prob.canonical()
    phases["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if precision != "float64":
        _precision_iv(can, precision)
    phases["precision_check"] = time.perf_counter() - t0
    x, cost, _, _ = babai_kernel(can, block_size=128, precision=precision, timings=phases,
                                 panels=panels)
    t0 = time.perf_counter()
    check_output("babai", can, x, cost)
    phases["output_check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if prob.perm is not None:
        fused = fused_passes(x.size)
        if fused is not None:
            fused.scatter_rows(x, prob.perm)
        else:
            xo = np.empty_like(x)
            xo[prob.perm] = x
    phases["reorder"] = time.perf_counter() - t0
    phases["sum"] = sum(phases.values())
    del x
    gc.collect()
    t0 = time.perf_counter()
    bils.babai(prob, precision=precision, backend="numba")
    phases["call"] = time.perf_counter() - t0
    return phases


#: Seconds of pause before every timed call of the focused run: BLAS (OpenBLAS, torch's
#: OpenMP) worker threads keep spinning for a while after a call and can take a core from
#: the next contender on a 2-core machine (measured: a Babai call right after a numpy
#: product took 1.0-1.3x, once 1.7x, the CPU time of one after a pause).
SETTLE_S = 0.25


class Rounds:
    """Interleaved timing: every contender once per round, all rounds kept.

    ``timed(label, fn)`` pauses :data:`SETTLE_S`, times ``fn()`` (wall and process CPU
    seconds of all threads) and appends both to the label's list; the result of the
    fastest call is kept in ``results``. ``best`` is the fastest per label (best-of-N),
    ``ratio(a, b)`` the per-round ratios ``a / b`` (contenders timed in the same round).
    """

    def __init__(self):
        self.wall, self.cpu, self.results = {}, {}, {}

    def timed(self, label, fn, keep=True):
        gc.collect()
        time.sleep(SETTLE_S)
        c0 = time.process_time()
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        cpu = time.process_time() - c0
        if keep and dt < min(self.wall.get(label, [np.inf])):
            self.results[label] = out
        self.add(label, dt, cpu)
        return out

    def add(self, label, wall, cpu):
        self.wall.setdefault(label, []).append(wall)
        self.cpu.setdefault(label, []).append(cpu)

    def best(self):
        return {k: min(v) for k, v in self.wall.items()}

    def best_cpu(self):
        return {k: min(v) for k, v in self.cpu.items()}

    def ratio(self, a, b):
        return [x / y for x, y in zip(self.wall[a], self.wall[b])]


#: Per-round ratios stored in the focused run's JSON (numerator, denominator).
ROUND_RATIOS = {
    "babai_grouped_f32_over_floor_f32": ("babai_grouped_float32", "floor_float32"),
    "babai_full_f32_over_floor_f32": ("babai_full_float32", "floor_float32"),
    "babai_grouped_f64_over_floor_f64": ("babai_grouped_float64", "floor_float64"),
    "lean_f32_over_babai_grouped_f32": ("lean_float32", "babai_grouped_float32"),
    "lean_f64_over_babai_grouped_f64": ("lean_float64", "babai_grouped_float64"),
    "klein8_over_babai_f64": ("klein8_grouped", "babai_grouped_float64_klein_round"),
    "kbest8_3bit_over_babai_3bit": ("kbest8_grouped_3bit", "babai_grouped_3bit_float64"),
}


def bench_focus(args):
    """Every figure of issue #23's "Must show" on one layer, measured side by side.

    Three sections of ``--repeats`` interleaved rounds each (every contender once per
    round, a :data:`SETTLE_S` pause before each call): (1) the float32 and float64
    product floors, numba Babai in both precisions and both grid forms and the lean torch
    loop in both precisions; (2) Babai float64 and Klein S=8; (3) Babai 3-bit and K-best
    K=8 3-bit. Figures use the fastest call per contender (best-of-N); the per-round
    ratios (contenders timed next to each other) are stored beside them.
    """
    import torch
    from _gptq_torch import gptq_lean

    n, k = (int(v) for v in args.focus_shape.split("x"))
    rec = {"n": n, "k": k, "group": GROUP, "bits": 4, "loadavg_start": os.getloadavg(),
           "repeats": args.repeats, "settle_s": SETTLE_S}
    torch.set_num_threads(os.cpu_count() or 1)
    H, W, N, rec["build_s"] = layer_data(n, k, seed=n + k)
    probs = {}
    for form in ("grouped", "full"):
        probs[form], rec[f"construct_{form}_s"], (sg, zg), groups = grouped_problem(H, W, 4, form == "grouped")
    rec["grid_bytes"] = {form: int(sum(np.asarray(getattr(g, "values", g)).nbytes
                                       for g in (p.scale, p.offset))) for form, p in probs.items()}
    Wt, Ht = torch.from_numpy(W), torch.from_numpy(H)
    sc, ze = torch.from_numpy(sg[:, groups]), torch.from_numpy(zg[:, groups])
    rng = np.random.default_rng(1)
    warm = {prec: bils.babai(probs["grouped"], precision=prec, backend="numba")  # compile
            for prec in ("float32", "float64")}
    del warm
    rd = Rounds()
    rec["loadavg_rounds"] = []

    # (1) the floor, Babai and the lean loop next to each other in every round
    for _ in range(args.repeats):
        for prec, dt in (("float32", np.float32), ("float64", np.float64)):
            gc.collect()
            time.sleep(SETTLE_S)
            f, rate, fcpu = product_floor(n, k, dt, rng)
            rd.add(f"floor_{prec}", f, fcpu)
            rec[f"floor_{prec}_gflops"] = max(rate, rec.get(f"floor_{prec}_gflops", 0.0))
            for form in ("grouped", "full"):
                rd.timed(f"babai_{form}_{prec}",
                         lambda: bils.babai(probs[form], precision=prec, backend="numba"))
            tdt = torch.float32 if prec == "float32" else torch.float64
            rd.timed(f"lean_{prec}", lambda: gptq_lean(Wt, Ht, sc, ze, dtype=tdt).numpy())
        rec["loadavg_rounds"].append(os.getloadavg())
    results = rd.results
    # the phase split of the fastest of `repeats` instrumented calls (sum of phases)
    rec["phases_s"] = {f"{form}_{prec}": min((babai_phases(probs[form], prec)
                                              for _ in range(args.repeats)), key=lambda ph: ph["sum"])
                       for form in ("grouped", "full") for prec in ("float32", "float64")}
    rec["phases_s"].update({f"panel_method_{form}_{prec}": babai_phases(probs[form], prec, True)
                            for form in ("grouped", "full") for prec in ("float32", "float64")})
    # agreement: numba grouped / full and the numpy reference, codes and layer loss
    xg = results["babai_grouped_float64"].x
    for label in ("babai_full_float64", "babai_grouped_float32", "babai_full_float32"):
        rec[f"codes_equal_{label}_vs_grouped_float64"] = float(np.mean(results[label].x == xg))
    for form in ("grouped", "full"):
        ref = rd.timed(f"babai_numpy_{form}_float64", lambda: bils.babai(probs[form], backend="numpy"),
                       keep=False)
        rec[f"numpy_vs_numba_codes_equal_{form}"] = float(np.mean(ref.x == results[f"babai_{form}_float64"].x))
        rec[f"numpy_vs_numba_identical_{form}"] = bool(np.array_equal(ref.x, results[f"babai_{form}_float64"].x))
        del ref
    losses = {}
    for prec in ("float32", "float64"):
        losses[f"babai_{prec}"] = layer_loss(W, H, results[f"babai_grouped_{prec}"].x.T, sg, zg, groups)
        losses[f"lean_{prec}"] = layer_loss(W, H, results[f"lean_{prec}"], sg, zg, groups)
        rec[f"codes_equal_lean_{prec}"] = float(np.mean(results[f"lean_{prec}"] == results[f"babai_grouped_{prec}"].x.T))
    rec["layer_loss"] = losses
    del Wt, Ht, sc, ze
    results.clear()
    gc.collect()
    if not args.skip_klein:
        # (2) Babai and Klein side by side; (3) Babai 3-bit and K-best side by side
        p = probs["grouped"]
        probs.clear()
        gc.collect()
        bils.klein(p, n_samples=1, rng=0, backend="numba")  # compile
        for _ in range(args.repeats):
            rd.timed("babai_grouped_float64_klein_round", lambda: bils.babai(p, backend="numba"),
                     keep=False)
            rd.timed("klein8_grouped", lambda: bils.klein(p, n_samples=8, rng=0, backend="numba"),
                     keep=False)
        rec["klein8_phases_s"] = klein_phases(p, 8)
        del p
        gc.collect()
        p3, _, _, _ = grouped_problem(H, W, 3, True)
        for _ in range(args.repeats):
            rd.timed("babai_grouped_3bit_float64", lambda: bils.babai(p3, backend="numba"), keep=False)
            rd.timed("kbest8_grouped_3bit", lambda: bils.kbest(p3, beam_width=8, backend="numba"),
                     keep=False)
        rec["kbest8_3bit_phases_s"] = kbest_phases(p3, 8)
        del p3
    rec["times_s"] = rd.best()
    rec["rounds_s"] = dict(rd.wall)
    rec["rounds_cpu_s"] = dict(rd.cpu)
    rec["round_ratios"] = {name: rd.ratio(a, b) for name, (a, b) in ROUND_RATIOS.items()
                           if a in rd.wall and b in rd.wall}
    rec["loadavg_end"] = os.getloadavg()
    rec["cpu_s"] = rd.best_cpu()
    CPU_TIMES.update({f"focus {k}": v for k, v in rec["cpu_s"].items()})
    rec["checks"] = focus_checks(rec)
    return rec


def kbest_phases(prob, beam_width):
    """Seconds per phase of one numba K-best call (``kbest_kernel``'s ``timings``), wall and
    process CPU time (all threads)."""
    from bils._numba._common import Clock
    from bils._numba.kbest import kbest_kernel

    can = prob.canonical()
    out = {}
    for clock, name in ((time.perf_counter, "wall"), (time.process_time, "cpu")):
        t = {}
        saved = Clock.now
        Clock.now = staticmethod(clock)
        try:
            t0 = clock()
            kbest_kernel(can, beam_width=beam_width, n_children=beam_width, timings=t)  # bils.kbest's default
            t["call"] = clock() - t0
        finally:
            Clock.now = saved
        out[name] = t
    return out


def klein_phases(prob, n_samples):
    """Seconds per phase of one numba Klein call (``klein_kernel``'s ``timings``)."""
    from bils._numba.klein import klein_kernel
    from bils.klein import lls_tau
    from bils._rng import column_seeds

    can = prob.canonical()
    k = can.Y.shape[1]
    tau = np.broadcast_to(np.asarray(lls_tau(can.R, can.scale, n_samples), dtype=float), (k,)).copy()
    t = {}
    t0 = time.perf_counter()
    klein_kernel(can, n_samples=n_samples, tau=tau, seeds=column_seeds(0, k), block_size=128,
                 timings=t)
    t["call"] = time.perf_counter() - t0
    return t


def focus_checks(rec):
    t, L = rec["times_s"], rec["layer_loss"]
    c = []

    def add(name, limit, value, ok):
        c.append({"name": name, "limit": limit, "measured": round(value, 4), "met": ok})

    for form, lim in (("grouped", 1.5), ("full", 2.0)):
        for prec in ("float32", "float64"):
            q = t[f"babai_{form}_{prec}"] / t["floor_float32"]
            add(f"babai {prec} ({form} grid) / float32 product floor", f"<= {lim}" if prec == "float32" else "-",
                q, q <= lim if prec == "float32" else None)
        q = t[f"babai_{form}_float64"] / t["floor_float64"]
        add(f"for information: babai float64 ({form} grid) / float64 product floor", "-", q, None)
    for prec in ("float32", "float64"):
        q = t[f"lean_{prec}"] / t[f"babai_grouped_{prec}"]
        add(f"lean torch loop / babai, both {prec} (grouped grid)", ">= 4", q, q >= 4)
        d = abs(L[f"babai_{prec}"] - L[f"lean_{prec}"]) / L[f"lean_{prec}"]
        add(f"layer loss |babai - loop| / loop, {prec}", "<= 0.1%", d, d <= 1e-3)
    for form in ("grouped", "full"):
        same = rec[f"numpy_vs_numba_identical_{form}"]
        add(f"codes numpy == numba ({form} grid, float64)", "identical",
            rec[f"numpy_vs_numba_codes_equal_{form}"], same)
    cpu = rec.get("cpu_s", {})
    if "floor_float32" in cpu:  # CPU seconds of all threads: robust to other load on the machine
        for form in ("grouped", "full"):
            q = cpu[f"babai_{form}_float32"] / cpu["floor_float32"]
            add(f"for information: CPU time babai float32 ({form}) / float32 floor", "-", q, None)
    if "klein8_grouped" in t:
        q = t["klein8_grouped"] / t["babai_grouped_float64_klein_round"]
        add("klein S=8 / babai (float64, grouped)", "<= 6", q, q <= 6)
        q = t["kbest8_grouped_3bit"] / t["babai_grouped_3bit_float64"]
        add("kbest K=8 3-bit / babai 3-bit (grouped)", "<= 8", q, q <= 8)
    return c


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
    ap.add_argument("--only", choices=["babai4096"], default=None,
                    help="babai4096: only the focused run of issue #23 (4096x4096 layer, grouped and "
                         "full grids, floor and lean loop side by side, per-phase timings, Klein, "
                         "K-best); writes cpu_solvers_focus.json")
    ap.add_argument("--focus-shape", default="4096x4096", help="layer of the focused run (in x out)")
    ap.add_argument("--focus-out", default="cpu_solvers_focus.json",
                    help="results file of the focused run (under benchmarks/results/)")
    args = ap.parse_args(argv)
    if args.only == "babai4096":
        return main_focus(args)

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


def main_focus(args):
    import numba

    payload = {"machine": machine_info(), "numba": numba.__version__,
               "numba_threads": numba.get_num_threads(), "targets": FOCUS_TARGETS,
               "note": "ratios are measured within one run (floor and lean loop next to Babai in "
                       "every round); see loadavg for other load on the machine"}
    warm_up()
    rec = bench_focus(args)
    payload["focus"] = rec
    payload["cpu_seconds"] = CPU_TIMES
    t = rec["times_s"]
    print(markdown_table(["what", "seconds"], [[k, f"{v:.3f}"] for k, v in t.items()]))
    print()
    print(markdown_table(["numba babai", "phase", "seconds"],
                         [[run, p, f"{v:.3f}"] for run, ph in rec["phases_s"].items()
                          for p, v in ph.items()]))
    print()
    print(markdown_table(["per-round ratio", "rounds", "median"],
                         [[name, " ".join(f"{v:.2f}" for v in vals), f"{np.median(vals):.2f}"]
                          for name, vals in rec["round_ratios"].items()]))
    if "klein8_phases_s" in rec:
        print("\nnumba Klein S=8 phases (s):",
              {p: round(v, 3) for p, v in rec["klein8_phases_s"].items()})
        for clock, ph in rec["kbest8_3bit_phases_s"].items():
            print(f"numba K-best K=8 3-bit phases ({clock} s):", {p: round(v, 3) for p, v in ph.items()})
    print(f"\nload average at start {rec['loadavg_start']}, per round {rec['loadavg_rounds']}, "
          f"at end {rec['loadavg_end']} ({os.cpu_count()} cores)\n")
    print(markdown_table(["target", "limit", "measured", "met"],
                         [[c["name"], c["limit"], c["measured"],
                           "-" if c["met"] is None else "yes" if c["met"] else "NO"]
                          for c in rec["checks"]]))
    if not args.no_write:
        path = write_json(args.focus_out, payload)
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

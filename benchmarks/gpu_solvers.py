"""GPU solver speed (``backend="cupy"``) on a 4096 x 4096 layer, against GPTQ's torch loop.

Question: on one GPU, how fast are the CUDA kernels of bils on the problem GPTQ users solve,
compared with GPTQ's own loop (``benchmarks/_gptq_torch.py``, ``gptq_lean``) running on the
same GPU in torch, and with a plain cuBLAS product of the same size?

Problem (as ``benchmarks/cpu_solvers.py``): activations with correlated and outlier
channels, ``H = X Xᵀ``, damping 0.01, act-order (``ordering="diag"``), static g128
asymmetric min-max grid, 4 bits (3 bits for K-best). The problem is built on the host;
its solve-order arrays (``R``, ``Y``, dense (n, k) ``scale``/``offset``) are copied to
the device once, and every GPU timing is a full public call on CuPy inputs (validation on
the device included), synchronised, minimum over ``--repeats`` after a warm-up (kernel
compilation is reported separately).

Sections: Babai float64 and float32 (codes compared with the numba backend on the host;
also the kernels alone on validated arrays, and a 128 x 32 call: the fixed cost of
launches),
Klein S = 8 and K-best K = 8 at 3 bits (codes compared with numba on the first
``--check-rhs`` columns), enumeration of 10⁵ RHS of n = 16 in the box [0, 7] (codes
compared with numba on the first ``--check-rhs`` columns), GPTQ's lean loop in torch on
the GPU (float32 as GPTQ), and a CuPy float32 (n, n) x (n, k) product (achieved FLOP/s).

Targets (ratios measured in one run): Babai >= 100x faster than the torch loop; codes equal
to numba in float64 and >= 99.9 % in float32; K-best K=8 <= 10x Babai; enumeration
10⁵ x n16 <= 1 s.

Usage: python benchmarks/gpu_solvers.py [--repeats 3] [--n 4096 --k 4096]
       NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_solvers.py --dry-run   (tiny, no GPU)
Writes benchmarks/results/gpu_solvers_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bils  # noqa: E402
from _common import machine_info, markdown_table, write_json  # noqa: E402
from cpu_solvers import build_problem, layer_data  # noqa: E402

TARGETS = {"babai_vs_torch_gptq": 100.0, "babai_f64_code_match": 1.0,
           "babai_f32_code_match": 0.999, "kbest8_over_babai": 10.0, "enum_1e5_n16_s": 1.0}


def device_module():
    """(xp, synchronize, device name): CuPy on a GPU; numpy under the CUDA simulator."""
    from bils._cuda._common import xp_module

    xp = xp_module()
    if xp is np:
        return np, (lambda: None), "cudasim"
    dev = xp.cuda.Device()
    name = xp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return xp, dev.synchronize, "".join(c if c.isalnum() else "_" for c in name)


def timed(fn, sync, repeats):
    """Minimum synchronised wall time of ``fn()`` over ``repeats`` runs, and its last result."""
    best, out = np.inf, None
    for _ in range(repeats):
        gc.collect()
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def on_device(prob, xp):
    """Solve-order arrays of ``prob`` on the device: (R, Y, lo, hi, scale, offset)."""
    c = prob.canonical()
    scale, offset = c.dense_grids()  # the benchmark passes per-coordinate grids (the API's full form)
    can = types.SimpleNamespace(R=c.R, Y=c.Y, lo=c.lo, hi=c.hi, scale=scale, offset=offset)
    dev = lambda a: xp.ascontiguousarray(xp.asarray(np.ascontiguousarray(a)))  # noqa: E731
    return (dev(can.R), dev(can.Y), int(can.lo.min()), int(can.hi.max()), dev(can.scale),
            dev(can.offset)), can


def sub(args, cols):
    R, Y, lo, hi, S, O = args
    return R, Y[:, cols], lo, hi, S[:, cols], O[:, cols]


def call(fn, a, **kw):
    R, Y, lo, hi, S, O = a
    return fn(R, Y, lo, hi, scale=S, offset=O, **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--enum-rhs", type=int, default=100_000)
    ap.add_argument("--check-rhs", type=int, default=256)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes, 1 repeat, no torch/cuBLAS sections (for the simulator)")
    ap.add_argument("--out", default=None, help="JSON file name (default gpu_solvers_<device>.json)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.n, args.k, args.repeats, args.enum_rhs, args.check_rhs = 24, 20, 1, 40, 8
    xp, sync, device = device_module()
    rec = {"machine": machine_info(), "device": device, "n": args.n, "k": args.k,
           "targets": TARGETS}
    print(f"gpu_solvers on {device}: layer {args.n} x {args.k}", flush=True)

    # warm-up: compile every kernel once (reported, not in the timings)
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    Rw = np.triu(rng.standard_normal((6, 6))) * 0.2 + np.eye(6)
    Yw = xp.asarray(rng.standard_normal((6, 3)))
    for prec in ("float64", "float32"):
        bils.babai(xp.asarray(Rw), Yw, 0, 3, precision=prec, backend="cupy")
    bils.klein(xp.asarray(Rw), Yw, 0, 3, n_samples=2, rng=0, backend="cupy")
    bils.kbest(xp.asarray(Rw), Yw, 0, 3, beam_width=8, backend="cupy")
    bils.enumerate(xp.asarray(Rw), Yw, 0, 3, backend="cupy")
    sync()
    rec["compile_s"] = time.perf_counter() - t

    H, W, N, rec["build_s"] = layer_data(args.n, args.k, seed=args.n + args.k)
    prob, rec["construct_s"], _ = build_problem(H, W, 4)
    dargs, can = on_device(prob, xp)
    R_host = np.ascontiguousarray(can.R)
    # Babai, both precisions, against numba on the host
    ref = {}
    for prec in ("float64", "float32"):
        t_gpu, res = timed(lambda: call(bils.babai, dargs, precision=prec, backend="cupy"), sync,
                           args.repeats)
        t_cpu = time.perf_counter()
        cpu = bils.babai(R_host, can.Y, can.lo, can.hi, scale=can.scale, offset=can.offset,
                         precision=prec, backend="numba")
        t_cpu = time.perf_counter() - t_cpu
        x = host(res.x)
        ref[prec] = cpu
        rec[f"babai_{prec}_s"] = t_gpu
        rec[f"babai_{prec}_numba_s"] = t_cpu
        rec[f"babai_{prec}_code_match"] = float(np.mean(x == cpu.x))
        rec[f"babai_{prec}_cost_rel_diff"] = float(np.max(np.abs(host(res.cost) - cpu.cost)
                                                          / np.maximum(cpu.cost, 1e-300)))
        del res
    # diagnostics: the kernels alone (validated arrays reused) and the fixed cost of a call
    from bils._cuda.babai import babai_kernel
    from bils._validate import problem_iv

    R_, Y_, lo_, hi_, S_, O_ = dargs
    can_d = problem_iv(R_, Y_, lo_, hi_, S_, O_)
    for prec in ("float64", "float32"):
        rec[f"babai_{prec}_kernels_only_s"], _ = timed(
            lambda: babai_kernel(can_d, block_size=128, precision=prec), sync, args.repeats)
    del can_d
    small = (xp.asarray(R_host[:128, :128]), dargs[1][:128, :32])
    rec["babai_128x32_call_s"], _ = timed(lambda: bils.babai(*small, 0, 15, backend="cupy"),
                                          sync, max(3, args.repeats))
    f64_x = ref["float64"].x
    rec["babai_float32_vs_float64_match"] = float(np.mean(ref["float32"].x == f64_x))
    del ref
    # Klein S = 8
    cols = slice(0, min(args.k, args.check_rhs))
    rec["klein8_s"], kl = timed(lambda: call(bils.klein, dargs, n_samples=8, rng=0,
                                             backend="cupy"), sync, max(1, args.repeats - 1))
    kl_sub = call(bils.klein, sub(dargs, cols), n_samples=8, rng=0, backend="cupy")
    cpu_kl = bils.klein(R_host, can.Y[:, cols], can.lo[:, cols], can.hi[:, cols],
                        scale=can.scale[:, cols], offset=can.offset[:, cols], n_samples=8, rng=0,
                        backend="numba")
    rec["klein8_code_match_sub"] = float(np.mean(host(kl_sub.x) == cpu_kl.x))
    rec["klein8_improved_frac"] = float(np.mean(host(kl.info["improved"])))
    rec["klein8_never_worse"] = bool(np.all(host(kl.cost) <= host(
        call(bils.babai, dargs, backend="cupy").cost) * (1 + 1e-12)))
    del kl, kl_sub, dargs
    gc.collect()
    # K-best K = 8 at 3 bits (and Babai on the same problem)
    p3, _, _ = build_problem(H, W, 3)
    d3, c3 = on_device(p3, xp)
    rec["babai3_s"], _ = timed(lambda: call(bils.babai, d3, backend="cupy"), sync, args.repeats)
    rec["kbest8_3bit_s"], kb = timed(lambda: call(bils.kbest, d3, beam_width=8, backend="cupy"),
                                     sync, max(1, args.repeats - 1))
    cpu_kb = bils.kbest(np.ascontiguousarray(c3.R), c3.Y[:, cols], c3.lo[:, cols], c3.hi[:, cols],
                        scale=c3.scale[:, cols], offset=c3.offset[:, cols], beam_width=8,
                        backend="numba")
    rec["kbest8_code_match_sub"] = float(np.mean(host(kb.x)[:, cols] == cpu_kb.x))
    del kb, d3, p3
    gc.collect()
    # enumeration: 1e5 RHS, n = 16, box [0, 7]
    rng = np.random.default_rng(16)
    n_e, k_e = 16, args.enum_rhs
    Re = np.triu(rng.normal(0, 0.3, (n_e, n_e)), 1) + np.diag(rng.uniform(1, 2, n_e))
    Ye = Re @ (rng.integers(0, 8, (n_e, k_e)) + rng.normal(0, 0.3, (n_e, k_e)))
    Re_d, Ye_d = xp.asarray(Re), xp.asarray(Ye)
    rec["enum_1e5_n16_s"], en = timed(lambda: bils.enumerate(Re_d, Ye_d, 0, 7, backend="cupy"),
                                      sync, args.repeats)
    ce = slice(0, min(k_e, 4 * args.check_rhs))
    cpu_en = bils.enumerate(Re, Ye[:, ce], 0, 7, backend="numba")
    rec["enum_rhs"] = k_e
    rec["enum_code_match_sub"] = float(np.mean(host(en.x)[:, ce] == cpu_en.x))
    rec["enum_all_optimal"] = bool(np.all(host(en.status) == bils.Status.OPTIMAL))
    rec["enum_median_nodes"] = float(np.median(host(en.info["nodes"])))
    del en
    # torch GPTQ loop on the GPU and a cuBLAS float32 product of the same size
    if not args.dry_run:
        import torch
        from _gptq_torch import gptq_lean, minmax_grid

        dev = torch.device("cuda")
        Wt, Ht = torch.from_numpy(W).to(dev), torch.from_numpy(H).to(dev)
        sc, ze = minmax_grid(torch.from_numpy(W), 4, 128)
        sc, ze = sc.to(dev), ze.to(dev)
        tsync = torch.cuda.synchronize
        gptq_lean(Wt, Ht, sc, ze)  # warm-up
        rec["torch_gptq_lean_f32_s"], q = timed(lambda: gptq_lean(Wt, Ht, sc, ze), tsync,
                                                args.repeats)
        del Wt, Ht, sc, ze, q
        A = xp.asarray(np.random.default_rng(1).standard_normal((args.n, args.n)),
                       dtype=np.float32)
        B = xp.asarray(np.random.default_rng(2).standard_normal((args.n, args.k)),
                       dtype=np.float32)
        A @ B
        rec["cupy_f32_matmul_s"], _ = timed(lambda: A @ B, sync, max(3, args.repeats))
        rec["cupy_f32_matmul_tflops"] = 2 * args.n * args.n * args.k / rec["cupy_f32_matmul_s"] / 1e12
        for prec in ("float64", "float32"):  # Babai's n^2 k flops against the product's rate
            rec[f"babai_{prec}_tflops"] = args.n * args.n * args.k / rec[f"babai_{prec}_s"] / 1e12
        rec["babai_vs_torch_gptq"] = rec["torch_gptq_lean_f32_s"] / rec["babai_float32_s"]
        rec["babai_f64_vs_torch_gptq"] = rec["torch_gptq_lean_f32_s"] / rec["babai_float64_s"]
        del A, B
    rec["kbest8_over_babai"] = rec["kbest8_3bit_s"] / rec["babai3_s"]
    rec["targets_met"] = {
        "babai_vs_torch_gptq": rec.get("babai_vs_torch_gptq", 0) >= TARGETS["babai_vs_torch_gptq"],
        "babai_f64_code_match": rec["babai_float64_code_match"] >= TARGETS["babai_f64_code_match"],
        "babai_f32_code_match": rec["babai_float32_code_match"] >= TARGETS["babai_f32_code_match"],
        "kbest8_over_babai": rec["kbest8_over_babai"] <= TARGETS["kbest8_over_babai"],
        "enum_1e5_n16_s": rec["enum_1e5_n16_s"] <= TARGETS["enum_1e5_n16_s"],
    }
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    keys = [k for k in rec if k not in ("machine", "targets", "targets_met")]
    print(markdown_table(["quantity", "value"], [[k, fmt(rec[k])] for k in keys]))
    print(markdown_table(["target", "met"], [[k, v] for k, v in rec["targets_met"].items()]))
    path = write_json(args.out or f"gpu_solvers_{device}.json", rec)
    print(f"wrote {path}")
    return rec


if __name__ == "__main__":
    main()

"""Scale-out on Dask: RHS-sharded solves and row-split layer solves, 1 vs 2 workers.

Questions:

1. How well does a large multi-RHS batch scale from 1 to 2 worker processes? 10⁶
   right-hand sides, n = 32, box [0, 15], ``bils.babai`` and ``bils.kbest(beam_width=8)``
   (numba backend, one numba thread per worker) on ``LocalCluster(n_workers=1|2,
   threads_per_worker=1)``. The targets are generated on the workers
   (``dask.array.random``, so no 256 MB upload), the factor ``R`` is one graph key, the
   result is reduced on the workers (total cost, code checksum). Target: ≥ 1.7× with 2
   workers on a quiet 2-core machine. Also: the same solve in memory in one process
   (one numba thread) and the overhead per chunk, ``(T_cluster,1 worker − T_in-memory) /
   chunks``, and a graph of tiny chunks (per-task cost of the scheduler).
2. The per-layer solves of SmolLM2-135M at W3 g128 (GPTQ = Babai, and OJBKQ) through
   :class:`llm_adapter.distributed.LayerSolveExecutor`: the 7 linear layers of one block
   (q, k, v, o: 576 in; gate, up: 1536 × 576; down: 576 × 1536) submitted together, 1 vs
   2 workers, against the local ``quantize_weight`` loop. The Hessians are random
   (correlated activations, 2048 tokens) with SmolLM2's exact shapes, not real calibration
   statistics: the solve time depends on the shapes, not on the values. Codes are checked
   equal to the local call.

The machine may be shared: the load average at start and end goes into the JSON, and
the 2-worker speed-up is understated when other processes compete for the 2 cores.
Re-run on a quiet machine with ``make bench-distributed`` (or the command below).

(Named so that it does not shadow the `distributed` package when benchmarks/ is on sys.path.)

Usage: python benchmarks/dask_scaling.py [--quick] [--k 1000000] [--chunk 50000] [--repeats 2]
       [--parts rhs,layers]
Writes benchmarks/results/distributed.json (atomically) and prints tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Take this folder off the path (Python puts a script's folder first; no script here may
# shadow a package) and load the shared helpers by file name.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)
os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # the in-memory reference: one thread, like a worker

_spec = importlib.util.spec_from_file_location("_bench_common", os.path.join(HERE, "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine_info, markdown_table, write_json = _common.machine_info, _common.markdown_table, _common.write_json

N = 32
HI = 15
SMOLLM2_BLOCK = {  # name: (out, in) of one SmolLM2-135M decoder block
    "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
    "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
}
N_BLOCKS = 30


def _version(dist):
    from importlib.metadata import version

    return version(dist)


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover
        return None


def make_factor(n=N, seed=0):
    """A well-conditioned upper-triangular factor with a box-sized lattice (cost per level ~ 1)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4 * n))
    G = X @ X.T / (4 * n)
    return np.linalg.cholesky(G).T.copy()


def targets(R, k, chunk, seed=1):
    """Lazy Y = R (x + e), x uniform in the box, e ~ N(0, 0.3²): generated on the workers."""
    import dask.array as da

    rs = da.random.default_rng(seed)
    Z = rs.uniform(-0.5, HI + 0.5, size=(R.shape[0], k), chunks=(R.shape[0], chunk))
    return Z.map_blocks(lambda z, R=R: R @ z, dtype=np.float64)


def cluster(n_workers):
    from distributed import Client, LocalCluster

    c = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                     dashboard_address=None, host="127.0.0.1",
                     env={"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                          "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                          "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
    return c, Client(c)


def solve_rhs(client, solver, R, Y, **kw):
    """Build, run on the cluster, reduce on the workers; returns (seconds, total cost, checksum)."""
    import dask

    t0 = time.perf_counter()
    res = solver(R, Y, 0, HI, backend="numba", **kw)
    total, check = dask.compute(res.cost.sum(), (res.x % 7).sum())
    return time.perf_counter() - t0, float(total), int(check)


def bench_rhs(args, out):
    import dask
    import dask.array as da
    from distributed import wait

    import bils

    R = make_factor()
    solvers = {"babai": (bils.babai, {}), "kbest8": (bils.kbest, {"beam_width": 8})}
    k, chunk = args.k, args.chunk
    n_chunks = -(-k // chunk)
    rows = []
    res = {"k": k, "n": N, "box": [0, HI], "chunk": chunk, "chunks": n_chunks, "solvers": {},
           "loadavg_start": _loadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    # in memory, one process, one numba thread (Y materialised first, not timed)
    Ymem = targets(R, k, chunk).compute(scheduler="sync")
    for name, (solver, kw) in solvers.items():
        solver(R, Ymem[:, :1000], 0, HI, backend="numba", **kw)  # compile / load the cache
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = solver(R, Ymem, 0, HI, backend="numba", **kw)
            ts.append(time.perf_counter() - t0)
        res["solvers"][name] = {"in_memory_s": min(ts), "in_memory_total_cost": float(r.cost.sum()),
                                "in_memory_checksum": int((r.x % 7).sum())}
    del Ymem
    for workers in (1, 2):
        c, client = cluster(workers)
        try:
            client.wait_for_workers(workers, timeout=120)
            Y = client.persist(targets(R, k, chunk))  # the RHS live on the workers, made before timing
            wait(Y)
            client.rebalance(Y)  # solve tasks run where their chunk lives: spread the chunks evenly
            res["placement"] = res.get("placement", {})
            res["placement"][f"workers{workers}"] = sorted(len(v) for v in client.has_what().values())
            for name, (solver, kw) in solvers.items():
                solve_rhs(client, solver, R, targets(R, 2 * workers * 1000, 1000), **kw)  # warm workers
                best = None
                for _ in range(args.repeats):
                    t, total, check = solve_rhs(client, solver, R, Y, **kw)
                    best = t if best is None else min(best, t)
                entry = res["solvers"][name]
                entry[f"workers{workers}_s"] = best
                assert check == entry["in_memory_checksum"], "cluster codes differ from in-memory"
                assert abs(total - entry["in_memory_total_cost"]) <= 1e-9 * abs(total)
            if workers == 1:  # per-task cost: many tiny chunks of a trivial solve
                tiny_chunks = 400
                Yt = da.from_array(np.zeros((N, tiny_chunks)), chunks=(N, 1))
                t0 = time.perf_counter()
                dask.compute(bils.babai(R, Yt, 0, HI, backend="numba").cost.sum())
                res["tiny_task_s"] = (time.perf_counter() - t0) / tiny_chunks
        finally:
            client.close()
            c.close()
    for name, e in res["solvers"].items():
        e["speedup_2_vs_1"] = e["workers1_s"] / e["workers2_s"]
        e["overhead_per_chunk_s"] = (e["workers1_s"] - e["in_memory_s"]) / n_chunks
        e["rhs_per_s_2_workers"] = k / e["workers2_s"]
        rows.append([name, f"{e['in_memory_s']:.2f}", f"{e['workers1_s']:.2f}", f"{e['workers2_s']:.2f}",
                     f"{e['speedup_2_vs_1']:.2f}x", f"{1e3 * e['overhead_per_chunk_s']:.1f}"])
    res["loadavg_end"] = _loadavg()
    out["rhs"] = res
    print(f"\n{k} RHS, n={N}, box [0, {HI}], {n_chunks} chunks of {chunk} (numba, 1 thread per worker)")
    print(markdown_table(["solver", "in-memory s", "1 worker s", "2 workers s", "speed-up",
                          "overhead/chunk ms"], rows))
    print(f"tiny-task cost (1 worker, 400 one-column chunks): {1e3 * res['tiny_task_s']:.2f} ms/task")


def random_layer(out_f, in_f, seed, tokens=2048):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_f, in_f // 4)) / np.sqrt(in_f // 4)
    X = mix @ rng.standard_normal((in_f // 4, tokens)) + 0.3 * rng.standard_normal((in_f, tokens))
    X *= rng.lognormal(0.0, 0.7, (in_f, 1))  # outlier channels, as in LLM activations
    H = X @ X.T / tokens
    W = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
    return W, H


def bench_layers(args, out):
    from llm_adapter import QuantSpec, quantize_weight
    from llm_adapter.distributed import LayerSolveExecutor

    layers = {name: random_layer(*shape, seed=i) for i, (name, shape) in enumerate(SMOLLM2_BLOCK.items())}
    specs = {"gptq": QuantSpec(bits=3, group_size=128, method="gptq"),
             "ojbkq": QuantSpec(bits=3, group_size=128, method="ojbkq")}
    res = {"loadavg_start": _loadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "model": "SmolLM2-135M shapes (random Hessians)", "bits": 3, "group_size": 128,
           "layers": {k: list(v) for k, v in SMOLLM2_BLOCK.items()}, "n_blocks": N_BLOCKS, "methods": {}}
    for mname, spec in specs.items():
        e = res["methods"][mname] = {"local_per_layer_s": {}}
        quantize_weight(*layers["k_proj"], None, spec, backend="numba", rng=0)  # warm-up
        local = {}
        t_all = time.perf_counter()
        for name, (W, H) in layers.items():
            quantize_weight(W[:8], H, None, spec, backend="numba", rng=0)  # this shape's first call
            t0 = time.perf_counter()
            local[name] = quantize_weight(W, H, None, spec, backend="numba", rng=0)
            e["local_per_layer_s"][name] = time.perf_counter() - t0
        e["local_block_s"] = time.perf_counter() - t_all
        # per-layer cost model t(m, n) = fixed(n) + m * per_row(n): time a quarter of the rows too
        e["cost_model"] = {}
        for name in ("o_proj", "down_proj"):
            W, H = layers[name]
            m = W.shape[0]
            t = {}
            for rows in (m, m // 4):
                best = None
                for _ in range(2):
                    t0 = time.perf_counter()
                    quantize_weight(W[:rows], H, None, spec, backend="numba", rng=0)
                    best = min(best or 1e9, time.perf_counter() - t0)
                t[rows] = best
            per_row = max(0.0, (t[m] - t[m // 4]) / (m - m // 4))
            e["cost_model"][name] = {"m": m, "n": H.shape[0], "t_full_s": t[m], "t_quarter_s": t[m // 4],
                                     "per_row_s": per_row, "fixed_s": max(0.0, t[m] - m * per_row)}
        for workers in (1, 2):
            c, client = cluster(workers)
            try:
                client.wait_for_workers(workers, timeout=120)
                ex = LayerSolveExecutor(client)
                ex.submit(*layers["k_proj"], None, spec, backend="numba", rng=0).result(timeout=600)
                t0 = time.perf_counter()
                futs = {name: ex.submit(W, H, None, spec, backend="numba", rng=0, name=name)
                        for name, (W, H) in layers.items()}
                got = {name: f.result(timeout=1200) for name, f in futs.items()}
                e[f"workers{workers}_block_s"] = time.perf_counter() - t0
                e[f"workers{workers}_tasks"] = sum(q.stats["tasks"] for q in got.values())
                for name in layers:
                    assert np.array_equal(got[name].codes, local[name].codes), name
            finally:
                client.close()
                c.close()
        e["speedup_2_vs_1"] = e["workers1_block_s"] / e["workers2_block_s"]
        e["model_estimate_2_workers_s"] = N_BLOCKS * e["workers2_block_s"]
        e["bytes_per_block_H"] = int(sum(H.nbytes for _, H in layers.values()))
    res["loadavg_end"] = _loadavg()
    out["layers"] = res
    rows = [[m, f"{e['local_block_s']:.2f}", f"{e['workers1_block_s']:.2f}", f"{e['workers2_block_s']:.2f}",
             f"{e['speedup_2_vs_1']:.2f}x", f"{e['model_estimate_2_workers_s']:.0f}"]
            for m, e in res["methods"].items()]
    print("\nSmolLM2-135M block (7 layers, W3 g128, random Hessians of the real shapes)")
    print(markdown_table(["method", "local s", "1 worker s", "2 workers s", "speed-up",
                          "30 blocks on 2 workers s"], rows))
    for m, e in res["methods"].items():
        print(m, "local per layer s:", {k: round(v, 3) for k, v in e["local_per_layer_s"].items()})
        print(m, "cost model t = fixed + m * per_row:",
              {k: (round(v["fixed_s"], 3), f"{1e3 * v['per_row_s']:.3f} ms/row") for k, v in e["cost_model"].items()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10⁵ RHS, one repeat (a smoke run)")
    p.add_argument("--k", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parts", default="rhs,layers",
                   help="comma-separated subset of rhs,layers; parts not run keep their entry "
                        "from an existing JSON")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts <= {"rhs", "layers"}:
        p.error(f"--parts must name rhs and/or layers, got {args.parts!r}")
    if args.quick:
        args.k, args.chunk, args.repeats = 100_000, 10_000, 1
    import dask
    import distributed
    import numba

    out = {"machine": machine_info(), "numba": numba.__version__, "dask": dask.__version__,
           "distributed": getattr(distributed, "__version__", None) or _version("distributed"), "loadavg_start": _loadavg(),
           "command": "python benchmarks/dask_scaling.py" + (" --quick" if args.quick else ""),
           "note": "2-core machine possibly shared with other jobs: see loadavg_*; a busy machine "
                   "understates the 2-worker speed-up"}
    name = "distributed_quick.json" if args.quick else "distributed.json"
    previous = os.path.join(_common.RESULTS, name)
    if os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        out.update({part: old[part] for part in ("rhs", "layers") if part in old and part not in parts})
    if "rhs" in parts:
        bench_rhs(args, out)
    if "layers" in parts:
        bench_layers(args, out)
    out["loadavg_end"] = _loadavg()
    print("wrote", write_json(name, out))


if __name__ == "__main__":
    main()

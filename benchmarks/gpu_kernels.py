"""Low-bit inference kernels on the GPU: the Llama-2-7B linear stack per token.

Question: how fast do the numba-cuda kernels of ``llm_adapter.kernels`` run the linear
layers of a 7B model per decoded token (batch 1) and for small batches (4, 16), next to
cuBLAS fp16, torch's int4 kernel and the device's copy bandwidth?

Per layer: 4 × (4096 → 4096) (q, k, v, o), 2 × (4096 → 11008) (gate, up), 1 × (11008 →
4096) (down); 32 layers = 224 products per step. Random weights of the real shapes
(random codes, scales in [0.01, 0.02], random zeros); ``--distinct`` layer sets (default 8,
each larger than the L2 cache) are cycled through the 32 layers, so no weight is read from
L2 ("rotated"). Each step is captured in a CUDA graph and replayed; the time is the median
of ``--repeats`` replays (CUDA events), after warm-up (the numba kernels compile then).

Methods: ``fp16`` (``F.linear``, cuBLAS), ``torch_int4`` (``aten._weight_int4pack_mm``,
g128, bfloat16 activations), ``W4 g128``, ``W3 g128``, ``W2 g128`` (``llm_adapter::quant_matmul``),
``glvq d8 2b`` (``llm_adapter::lattice_matmul``, g128), and a device-to-device copy of the
W4 stack's bytes (the bandwidth floor). Reported: ms per step, weight bytes read, achieved
bandwidth and its fraction of the copy bandwidth, speed-up over fp16.

Targets (issue #15), checked in the same run: batch 1 — W4 ≥ 3.5× fp16 and ≥ 1.6× torch int4,
W3 ≥ 4.5× fp16, W2 ≥ 6× fp16, glvq d8 2-bit within 1.3× of W2; batch 16 — every kernel at
least as fast as fp16.

Usage: python benchmarks/gpu_kernels.py [--batches 1 4 16] [--repeats 20] [--distinct 8]
       NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_kernels.py --tiny [--out DIR]   (simulator)
Writes benchmarks/results/gpu_kernels_<device>.json (atomically; ``rows`` holds one record
per method and batch for docs/gen_plots.py) and prints a table. The tiny mode checks every
kernel against its oracle on small shapes and writes JSON only with --out.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, machine_info, markdown_table, write_json  # noqa: E402

logger = logging.getLogger("gpu_kernels")

#: (in, out) of the linears of one Llama-2-7B decoder layer.
LAYER_SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
N_LAYERS = 32
GROUP = 128
METHODS = ("fp16", "torch_int4", "W4 g128", "W3 g128", "W2 g128", "glvq d8 2b")
TARGETS = [  # (batch, method, reference, factor): time(reference) / time(method) >= factor
    (1, "W4 g128", "fp16", 3.5), (1, "W4 g128", "torch_int4", 1.6), (1, "W3 g128", "fp16", 4.5),
    (1, "W2 g128", "fp16", 6.0), (1, "glvq d8 2b", "W2 g128", 1 / 1.3),
    (16, "W4 g128", "fp16", 1.0), (16, "W3 g128", "fp16", 1.0), (16, "W2 g128", "fp16", 1.0),
    (16, "glvq d8 2b", "fp16", 1.0),
]


# --------------------------------------------------------------------------- layers (torch, device)


def _uniform(torch, bits, k, n, dev, gen):
    from llm_adapter.formats.packing import packed_length

    words = packed_length(k, bits)
    qweight = torch.randint(-2**31, 2**31 - 1, (words, n), dtype=torch.int32, device=dev, generator=gen)
    ng = k // GROUP
    scales = (torch.rand(ng, n, device=dev, generator=gen) * 0.01 + 0.01).half()
    zeros = torch.randint(0, 1 << bits, (ng, n), device=dev, generator=gen).half()
    return {"qweight": qweight, "scales": scales, "zeros": zeros, "bits": bits, "k": k}


def _lattice(torch, k, n, dev, gen):
    from llm_adapter.formats.packing import packed_length

    ng = k // GROUP
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (n, packed_length(k, 2)), dtype=torch.int32, device=dev,
                                     generator=gen),
            "generators": (torch.randn(ng, 8, 8, device=dev, generator=gen) * 0.01).half(),
            "group_bits": torch.full((ng,), 2, dtype=torch.uint8, device=dev),
            "row_scale": (torch.rand(n, device=dev, generator=gen) + 0.5).half(), "k": k}


def _int4(torch, k, n, dev, gen):
    w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev, generator=gen)
    w_u8 = ((w[:, ::2] << 4) | w[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
    sz = (torch.rand(k // GROUP, n, 2, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
    return {"packed": packed, "sz": sz}


def _nbytes(torch, obj) -> int:
    return sum(v.numel() * v.element_size() for v in obj.values() if isinstance(v, torch.Tensor))


def build(torch, method, distinct, dev):
    """``distinct`` layer sets of `method`: a list of (apply(x_in, x_mid) -> None, bytes)."""
    import torch.nn.functional as F

    import llm_adapter.nn  # noqa: F401  (registers the ops)

    gen = torch.Generator(device=dev).manual_seed(0)
    sets = []
    for _ in range(distinct):
        layers = []
        for k, n in LAYER_SHAPES:
            if method == "fp16":
                w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).half()
                layers.append(((lambda w: lambda x: F.linear(x, w))(w), w.numel() * 2, k))
            elif method == "torch_int4":
                p = _int4(torch, k, n, dev, gen)
                layers.append(((lambda p: lambda x: torch.ops.aten._weight_int4pack_mm(x, p["packed"], GROUP, p["sz"]))(p),
                               _nbytes(torch, p), k))
            elif method.startswith("glvq"):
                p = _lattice(torch, k, n, dev, gen)
                layers.append(((lambda p: lambda x: torch.ops.llm_adapter.lattice_matmul(
                    x, p["qweight"], p["generators"], p["group_bits"], p["row_scale"], None, None, 2, 8, GROUP,
                    p["k"], 0.5))(p), _nbytes(torch, p), k))
            else:
                bits = int(method[1])
                p = _uniform(torch, bits, k, n, dev, gen)
                layers.append(((lambda p: lambda x: torch.ops.llm_adapter.quant_matmul(
                    x, p["qweight"], p["scales"], p["zeros"], None, None, p["bits"], GROUP, p["k"]))(p),
                    _nbytes(torch, p), k))
        sets.append(layers)
    return sets


def time_step(torch, sets, batch, dtype, dev, repeats):
    """Median ms of one 32-layer step (CUDA graph replay), and the weight bytes it reads."""
    xs = {k: torch.randn(batch, k, device=dev).to(dtype) for k in {4096, 11008}}
    order = [sets[i % len(sets)] for i in range(N_LAYERS)]

    def step():
        for layers in order:
            for fn, _, k in layers:
                fn(xs[k])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()  # warm-up: compiles the numba kernels, fills the caches of the ops
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    nbytes = sum(nb for layers in order for _, nb, _ in layers)
    del graph
    return float(np.median(times)), nbytes


def copy_bandwidth(torch, nbytes, dev, repeats):
    """Device-to-device copy of `nbytes` (read + write): GB/s of bytes *read*."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = float(np.median(times))
    return ms, 2 * nbytes / ms / 1e6  # read + write bytes per second, in GB/s


def run_device(args):
    import torch

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    rows, results = [], {"device": name, "machine": machine_info(), "torch": torch.__version__,
                         "shapes": LAYER_SHAPES, "n_layers": N_LAYERS, "distinct": args.distinct,
                         "group_size": GROUP, "batches": {}}
    for batch in args.batches:
        res = {}
        for method in args.methods:
            t0 = time.perf_counter()
            try:
                sets = build(torch, method, args.distinct, dev)
                dtype = torch.bfloat16 if method == "torch_int4" else torch.float16
                ms, nbytes = time_step(torch, sets, batch, dtype, dev, args.repeats)
                res[method] = {"ms": ms, "weight_bytes": nbytes, "GBps": nbytes / ms / 1e6,
                               "setup_s": time.perf_counter() - t0}
            except Exception as err:  # report and go on: one failing method must not hide the others
                logger.exception("%s, batch %d failed", method, batch)
                res[method] = {"error": f"{type(err).__name__}: {err}"}
            finally:
                sets = None
                torch.cuda.empty_cache()
        results["batches"][str(batch)] = res
    w4 = results["batches"][str(args.batches[0])].get("W4 g128", {}).get("weight_bytes", 4 * 2**30)
    ms, bw = copy_bandwidth(torch, int(w4), dev, args.repeats)
    results["copy"] = {"bytes": int(w4), "ms": ms, "GBps": bw}
    for batch, res in results["batches"].items():
        fp = res.get("fp16", {}).get("ms")
        for method, r in res.items():
            if "ms" in r:
                r["speedup_vs_fp16"] = fp / r["ms"] if fp else None
                r["frac_of_copy_bw"] = r["GBps"] / bw
                rows.append([batch, method, f"{r['ms']:.3f}", f"{r['weight_bytes'] / 1e9:.2f}", f"{r['GBps']:.0f}",
                             f"{r['frac_of_copy_bw']:.2f}", f"{r['speedup_vs_fp16']:.2f}" if fp else "-"])
            else:
                rows.append([batch, method, "error", "", "", "", r["error"][:60]])
    checks = []
    for batch, method, ref, factor in TARGETS:
        res = results["batches"].get(str(batch), {})
        a, b = res.get(method, {}).get("ms"), res.get(ref, {}).get("ms")
        ratio = b / a if a and b else None
        checks.append({"batch": batch, "method": method, "vs": ref, "target": factor, "ratio": ratio,
                       "ok": None if ratio is None else bool(ratio >= factor)})
    results["targets"] = checks
    results["rows"] = [{"method": m, "batch": int(b), "ms": r["ms"], "GBps": r["GBps"]}
                       for b, res in results["batches"].items() for m, r in res.items() if "ms" in r]
    print(f"\n{name}: Llama-2-7B linear stack per step ({N_LAYERS} layers, {len(LAYER_SHAPES)} linears each), "
          f"CUDA graphs, median of {args.repeats}; copy bandwidth {bw:.0f} GB/s ({ms:.3f} ms for {w4 / 1e9:.2f} GB)\n")
    print(markdown_table(["batch", "method", "ms/step", "weights GB", "GB/s", "of copy bw", "× fp16"], rows))
    print()
    print(markdown_table(["batch", "method", "vs", "target ×", "measured ×", "ok"],
                         [[c["batch"], c["method"], c["vs"], f"{c['target']:.2f}",
                           "-" if c["ratio"] is None else f"{c['ratio']:.2f}", c["ok"]] for c in checks]))
    dev_name = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    path = write_json(f"gpu_kernels_{dev_name}.json", results) if args.out is None else _write_to(args.out, dev_name,
                                                                                                   results)
    print(f"\nwrote {path}")
    return results


# --------------------------------------------------------------------------- tiny (simulator)


def run_tiny(args):
    """Every method's kernel on tiny shapes in numba-cuda's simulator, against the numpy
    oracle; times are meaningless there (only the plumbing is exercised)."""
    from llm_adapter import kernels as K
    from llm_adapter.formats.packing import pack

    rng = np.random.default_rng(0)
    shapes = [(64, 32), (96, 64)]
    rows, results = [], {"device": "numba-cuda simulator", "mode": "tiny", "machine": machine_info(),
                         "shapes": shapes, "batches": {}}
    for batch in args.batches:
        res = {}
        for method in ("W4 g32", "W3 g32", "W2 g32", "glvq d8 2b"):
            err = 0.0
            t0 = time.perf_counter()
            for k, n in shapes:
                x = rng.standard_normal((batch, k)).astype(np.float16)
                if method.startswith("glvq"):
                    codes = rng.integers(0, 4, (n, k))
                    G = (rng.standard_normal((k // 32, 8, 8)) * 0.1).astype(np.float16)
                    p = {"qweight_t": pack(codes.T, 2, axis=0), "generators": G,
                         "centre": np.full(k // 32, -1.5, np.float32), "row_scale": np.ones((1, n), np.float16),
                         "col_scale": None, "bias": None, "bits": 2, "d": 8, "group_size": 32, "in_features": k}
                    y = K.lattice_matmul(x, p["qweight_t"], G, p["centre"], p["row_scale"], None, None, bits=2, d=8,
                                         group_size=32, in_features=k)
                    ref = K.lattice_matmul_reference(x, p)
                else:
                    bits = int(method[1])
                    codes = rng.integers(0, 1 << bits, (k, n))
                    scales = rng.uniform(0.01, 0.02, (k // 32, n)).astype(np.float16)
                    zeros = rng.integers(0, 1 << bits, (k // 32, n)).astype(np.float16)
                    y = K.quant_matmul(x, pack(codes, bits, axis=0), scales, zeros, None, bits, 32, k)
                    g = np.arange(k) // 32
                    ref = x.astype(np.float64) @ (scales[g].astype(np.float64) * (codes - zeros[g]))
                err = max(err, float(np.max(np.abs(y - ref) / (np.abs(ref).max() + 1e-9))))
            res[method] = {"max_rel_err": err, "s": time.perf_counter() - t0}
            rows.append([batch, method, f"{err:.2e}", f"{res[method]['s']:.2f}"])
        results["batches"][str(batch)] = res
    print(markdown_table(["batch", "method", "max rel err vs oracle", "simulator s"], rows))
    if args.out:  # never into benchmarks/results: simulator times are not timings
        print(f"wrote {_write_to(args.out, 'tiny_simulator', results)}")
    return results


def _write_to(out_dir, dev_name, payload):
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"gpu_kernels_{dev_name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--distinct", type=int, default=8, help="distinct layer sets cycled through the 32 layers")
    p.add_argument("--tiny", action="store_true", help="tiny shapes in the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    p.add_argument("--out", default=None, help=f"directory of the JSON (default {RESULTS})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tiny:
        return run_tiny(args)
    return run_device(args)


if __name__ == "__main__":
    main()

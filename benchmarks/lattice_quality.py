"""Perplexity of SmolLM2 at 2 bits per weight: grouped lattice VQ (glvq) against uniform GPTQ.

Question: at no more bits per weight (all overhead counted), does glvq (d = 8, one fp16
generator per 128 input columns, fp16 row scales) beat uniform GPTQ W2 with groups of
128 and 64 (fp16 scale + 2-bit zero per group)? And how do the encoders compare inside
glvq: round-off (GLVQ's "Babai rounding"), nearest plane, exact (Schnorr–Euchner)?

Protocols (``--protocol``):

``fp`` (default; what fits a shared 2-core CPU)
    One forward pass of the float model over the calibration windows collects the input
    Gram ``H`` of every linear layer of the decoder blocks (cached on disk); every run
    then quantizes all layers from those same ``H`` and is evaluated. Methods see
    identical statistics, so the comparison is fair, but inputs are not the outputs of
    already-quantized blocks (GPTQ's sequential protocol), which favours no method.
``sequential``
    :func:`llm_adapter.calibrate.quantize_model`, true-sequential (the protocol of
    ``benchmarks/llm_quality.py``); roughly 4 forward passes per block per run.

Data as ``benchmarks/llm_quality.py``: model ``smollm2-135m`` (float32, CPU), calibration
``--calib-windows`` random windows × 512 tokens of the Shakespeare calibration plays
(seed 0), evaluation the first 32 windows × 512 tokens of the held-out plays. Results
are merged into ``benchmarks/results/lattice_quality.json`` (one entry per protocol and
run) and a table is printed.

Usage::

    python benchmarks/lattice_quality.py --runs glvq_np gptq_w2g128 gptq_w2g64
    python benchmarks/lattice_quality.py --runs glvq_ro glvq_exact --calib-windows 32
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm_adapter.data import calibration_windows, evaluation_windows, load_text  # noqa: E402
from llm_adapter.evaluate import perplexity  # noqa: E402
from llm_adapter.lattice_method import GLVQSpec, quantize_weight_glvq  # noqa: E402
from llm_adapter.models import load_model  # noqa: E402

logger = logging.getLogger("lattice_quality")

#: Runs: name -> (kind, spec fields, backend).
RUNS = {
    "glvq_np": ("glvq", {}, "numpy"),
    "glvq_ro": ("glvq", {"encode": "round_off"}, "numpy"),
    "glvq_exact": ("glvq", {"encode": "exact", "fit_encode": "nearest_plane"}, "auto"),
    "glvq_np_d4": ("glvq", {"d": 4}, "numpy"),
    "gptq_w2g128": ("gptq", {"bits": 2, "group_size": 128}, "auto"),
    "gptq_w2g64": ("gptq", {"bits": 2, "group_size": 64}, "auto"),
}
LABELS = {
    "glvq_np": "glvq d=8, nearest plane",
    "glvq_ro": "glvq d=8, round-off",
    "glvq_exact": "glvq d=8, exact (fit with nearest plane)",
    "glvq_np_d4": "glvq d=4, nearest plane",
    "gptq_w2g128": "gptq W2 g128",
    "gptq_w2g64": "gptq W2 g64",
}

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lattice_quality.json"
FLOAT_JSON = ROOT / "benchmarks" / "results" / "llm_quality.json"


def _gptq_bits(bits, group_size, in_features):
    """Bits per weight of the GPTQ layout: codes + per group fp16 scale + packed zero."""
    gs = in_features if group_size == -1 else group_size
    return bits + (16 + bits) / gs


# --------------------------------------------------------------------------- fp protocol
def _linears(model, targets=("*",)):
    from llm_adapter.calibrate import select_linears

    return {n: m for sel in select_linears(model, targets).values() for n, m in sel.items()}


def collect_hessians(model, windows, cache_dir, batch_size, targets=("*",)):
    """``{layer: H}`` (float64 sums / tokens) from one float forward pass; cached per file."""
    from llm_adapter.calibrate import forward_pre_hooks

    tag = "" if tuple(targets) == ("*",) else "_" + str(abs(hash(tuple(targets))) % 10**8)
    cache = Path(cache_dir) / f"H_{windows.shape[0]}x{windows.shape[1]}{tag}.npz"
    layers = _linears(model, targets)
    if cache.exists():
        with np.load(cache) as z:
            logger.info("H loaded from %s", cache)
            return {n: z[n].astype(np.float64) for n in layers}
    acc, owner = {}, {}
    last = {"x": None, "name": None}

    def hook(name, mod, args):
        x = args[0]
        if x is last["x"]:  # same input tensor as the previous layer (q/k/v, gate/up)
            owner[name] = owner[last["name"]]
            return
        last["x"], last["name"] = x, name
        owner[name] = name
        a = x.reshape(-1, x.shape[-1]).double()
        acc[name] = acc.get(name, 0) + (a.T @ a)

    t0 = time.perf_counter()
    with torch.no_grad(), forward_pre_hooks(layers, hook):
        for b0 in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[b0:b0 + batch_size], use_cache=False)
            last["x"] = None
            logger.info("H pass: %d/%d windows (%.0f s)", min(b0 + batch_size, windows.shape[0]),
                        windows.shape[0], time.perf_counter() - t0)
    n_tok = windows.numel()
    H = {n: (acc[owner[n]] / n_tok).numpy() for n in layers}
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **{n: h.astype(np.float32) for n, h in H.items()})
    os.replace(tmp, cache)
    return {n: h.astype(np.float32).astype(np.float64) for n, h in H.items()}


def quantize_fp(model, H, run, float_state, targets=("*",)):
    """Quantize every selected layer from its float-pass ``H``; weights replaced in place."""
    kind, fields, backend = RUNS[run]
    model.load_state_dict(float_state)
    layers = _linears(model, targets)
    bits_total = weights_total = 0
    rel = []
    for name, mod in layers.items():
        W = mod.weight.detach().double().numpy()
        if kind == "glvq":
            q = quantize_weight_glvq(W, H[name], spec=GLVQSpec(**fields), backend=backend)
            bits_total += q.storage_bits()
        else:
            from llm_adapter.quantize import quantize_weight
            from llm_adapter.spec import QuantSpec

            q = quantize_weight(W, H[name], None, QuantSpec(method="gptq", **fields), backend=backend)
            bits_total += _gptq_bits(fields["bits"], fields["group_size"], W.shape[1]) * W.size
        weights_total += W.size
        rel.append(q.stats["rel_loss"])
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(q.dequantize()).to(mod.weight.dtype))
        logger.info("%s %s: rel_loss %.4g  %.1f s", run, name, q.stats["rel_loss"], q.stats["time"])
    return {"bits_per_weight": bits_total / weights_total, "mean_rel_loss": float(np.mean(rel)),
            "rel_loss": dict(zip(layers, map(float, rel)))}


# --------------------------------------------------------------------------- sequential
@contextlib.contextmanager
def _glvq_dispatch(gspec):
    """Route :func:`quantize_model`'s per-layer call to glvq.

    Stopgap until ``llm_adapter.calibrate`` dispatches on ``spec.method == "glvq"``
    itself; the carrier spec given to ``quantize_model`` only sets damping and "not joint".
    """
    from llm_adapter import calibrate

    orig = calibrate.quantize_weight
    calibrate.quantize_weight = lambda W, H, D, spec, **kw: quantize_weight_glvq(W, H, D, gspec, **kw)
    try:
        yield
    finally:
        calibrate.quantize_weight = orig


def quantize_sequential(model, windows, run, float_state, batch_size, targets=("*",)):
    from llm_adapter.calibrate import quantize_model
    from llm_adapter.spec import QuantSpec

    kind, fields, backend = RUNS[run]
    model.load_state_dict(float_state)
    if kind == "glvq":
        gspec = GLVQSpec(**fields)
        with _glvq_dispatch(gspec):
            layers = quantize_model(model, windows, QuantSpec(method="gptq", damp=gspec.damp), targets=targets,
                                    batch_size=batch_size, backend=backend, progress=False)
        bits = sum(q.storage_bits() for q in layers.values())
    else:
        layers = quantize_model(model, windows, QuantSpec(method="gptq", **fields), targets=targets,
                                batch_size=batch_size, backend=backend, progress=False)
        bits = sum(_gptq_bits(q.bits, q.group_size, q.shape[1]) * q.codes.size for q in layers.values())
    rel = {n: float(q.stats["rel_loss"]) for n, q in layers.items()}
    return {"bits_per_weight": bits / sum(q.codes.size for q in layers.values()),
            "mean_rel_loss": float(np.mean(list(rel.values()))), "rel_loss": rel}


# --------------------------------------------------------------------------- results
def _merge(path, key, entry):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        data.setdefault("runs", {})[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    return data


def table(data) -> str:
    lines = ["| protocol | calib windows | run | bits/weight | ppl | mean layer rel. loss | quant. time (s) |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(data.get("runs", {})):
        r = data["runs"][key]
        lines.append(f"| {r['protocol']} | {r['calib_windows']} | {LABELS.get(r['run'], r['run'])} | "
                     f"{r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['mean_rel_loss']:.4f} | "
                     f"{r['quant_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["glvq_np", "gptq_w2g128", "gptq_w2g64"], choices=list(RUNS))
    ap.add_argument("--protocol", choices=("fp", "sequential"), default="fp")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["*"],
                    help="fnmatch patterns of the layers to quantize (smoke tests); default all")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lattice_quality")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.table_only:
        print(table(json.loads(args.out.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    model.eval()
    calib = calibration_windows(tok, load_text("shakespeare", split="calibration"),
                                n_windows=args.calib_windows, seqlen=args.seqlen, seed=args.seed)
    evalw = evaluation_windows(tok, load_text("shakespeare", split="evaluation"),
                               n_windows=args.eval_windows, seqlen=args.seqlen)
    float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    H = None
    if args.protocol == "fp":
        H = collect_hessians(model, calib, args.cache_dir, args.batch_size, args.targets)
    for run in args.runs:
        t0 = time.perf_counter()
        if args.protocol == "fp":
            res = quantize_fp(model, H, run, float_state, args.targets)
        else:
            res = quantize_sequential(model, calib, run, float_state, args.batch_size, args.targets)
        tq = time.perf_counter() - t0
        t1 = time.perf_counter()
        ppl = perplexity(model, evalw, batch_size=args.batch_size, progress=False)
        te = time.perf_counter() - t1
        kind, fields, backend = RUNS[run]
        entry = {"run": run, "kind": kind, "fields": fields, "backend": backend, "protocol": args.protocol,
                 "calib_windows": args.calib_windows, "eval_windows": args.eval_windows, "seqlen": args.seqlen,
                 "seed": args.seed, "model": args.model, "ppl": ppl.ppl, "nll": ppl.nll,
                 "quant_time_s": tq, "eval_time_s": te, **res,
                 "spec": GLVQSpec(**fields).to_dict() if kind == "glvq" else None}
        key = f"{args.protocol}/c{args.calib_windows}/{run}"
        if args.targets != ["*"]:
            key += "/targets=" + ",".join(args.targets)
        entry["targets"] = args.targets
        data = _merge(args.out, key, entry)
        logger.info("%s: ppl %.3f  bits/weight %.4f  mean rel loss %.4g  (quant %.0f s, eval %.0f s)",
                    key, ppl.ppl, res["bits_per_weight"], res["mean_rel_loss"], tq, te)
    if FLOAT_JSON.exists():
        fl = json.loads(FLOAT_JSON.read_text()).get("float", {}).get("ppl")
        if fl:
            logger.info("float perplexity (benchmarks/llm_quality.py): %.3f", fl)
    print(table(data))


if __name__ == "__main__":
    main()

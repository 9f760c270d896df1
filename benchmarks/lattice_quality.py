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
    :func:`llm_adapter.calibration.quantize_model`, true-sequential (the protocol of
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
import fcntl
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import write_atomically, write_doc, write_json_file  # noqa: E402
from llm_adapter.data import calibration_windows, evaluation_windows, load_text  # noqa: E402
from llm_adapter.evaluate import perplexity  # noqa: E402
from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq  # noqa: E402
from llm_adapter.models import load_model  # noqa: E402

logger = logging.getLogger("lattice_quality")

#: Runs: name -> (kind, spec fields, backend).
RUNS = {
    "glvq_np": ("glvq", {"encode": "nearest_plane", "fit_encode": None}, "numpy"),
    "glvq_ro": ("glvq", {"encode": "round_off", "fit_encode": None}, "numpy"),
    "glvq_exact": ("glvq", {"encode": "exact", "fit_encode": "nearest_plane"}, "auto"),
    "glvq_np_d4": ("glvq", {"d": 4, "encode": "nearest_plane", "fit_encode": None}, "numpy"),
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
DEFAULT_DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- lattice_quality:begin -->", "<!-- lattice_quality:end -->"
FLOAT_JSON = ROOT / "benchmarks" / "results" / "llm_quality.json"


def _gptq_bits(bits, group_size, in_features):
    """Bits per weight of the GPTQ layout: codes + per group fp16 scale + packed zero."""
    gs = in_features if group_size == -1 else group_size
    return bits + (16 + bits) / gs


# --------------------------------------------------------------------------- fp protocol
def _linears(model, targets=("*",)):
    from llm_adapter.calibration import select_linears

    return {n: m for sel in select_linears(model, targets).values() for n, m in sel.items()}


def collect_hessians(model, windows, cache_dir, batch_size, targets=("*",)):
    """``{layer: H}`` (float64 sums / tokens) from one float forward pass; cached per file."""
    from llm_adapter.calibration import forward_pre_hooks

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
    buf = io.BytesIO()
    np.savez(buf, **{n: h.astype(np.float32) for n, h in H.items()})
    write_atomically(cache, buf.getvalue())
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
            from llm_adapter.methods.uniform import quantize_weight
            from llm_adapter.methods.uniform import QuantSpec

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
def quantize_sequential(model, windows, run, float_state, batch_size, targets=("*",), checkpoint_dir=None):
    """True-sequential :func:`~llm_adapter.calibration.quantize_model` (glvq or gptq) in place."""
    from llm_adapter.calibration import quantize_model
    from llm_adapter.methods.uniform import QuantSpec

    kind, fields, backend = RUNS[run]
    model.load_state_dict(float_state)
    spec = GLVQSpec(**fields) if kind == "glvq" else QuantSpec(method="gptq", **fields)
    layers = quantize_model(model, windows, spec, targets=targets, batch_size=batch_size, backend=backend,
                            checkpoint_dir=checkpoint_dir, progress=False)
    if kind == "glvq":
        bits = sum(q.storage_bits() for q in layers.values())
    else:
        bits = sum(_gptq_bits(q.bits, q.group_size, q.shape[1]) * q.codes.size for q in layers.values())
    rel = {n: float(q.stats["rel_loss"]) for n, q in layers.items()}
    return {"bits_per_weight": bits / sum(q.codes.size for q in layers.values()),
            "mean_rel_loss": float(np.mean(list(rel.values()))), "rel_loss": rel}


# --------------------------------------------------------------------------- layer study
#: Layers of the layer-level study (one of each kind, two depths).
STUDY_LAYERS = ("model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj",
                "model.layers.2.mlp.down_proj", "model.layers.15.mlp.up_proj",
                "model.layers.15.self_attn.k_proj")
#: Variants of the layer-level study: name -> (kind, fields, backend).
STUDY = {
    "gptq_w2g128": RUNS["gptq_w2g128"],
    "gptq_w2g64": RUNS["gptq_w2g64"],
    "glvq_ro": RUNS["glvq_ro"],
    "glvq_np_it0": ("glvq", {"n_iter": 0, **RUNS["glvq_np"][1]}, "numpy"),
    "glvq_np": RUNS["glvq_np"],
    "glvq_np_natural_order": ("glvq", {"order": "natural", **RUNS["glvq_np"][1]}, "numpy"),
    "glvq_np_col_scale": ("glvq", {"col_scale": True, **RUNS["glvq_np"][1]}, "numpy"),
    "glvq_np_salience25": ("glvq", {"salience_frac": 0.25, **RUNS["glvq_np"][1]}, "numpy"),
    "glvq_exact": RUNS["glvq_exact"],
    "glvq_kbest8": ("glvq", {"encode": "kbest", "fit_encode": "nearest_plane", "beam_width": 8}, "numpy"),
    "glvq_np_d4": RUNS["glvq_np_d4"],
}


#: The variants run by ``--layer-study`` (kbest and d = 4 are slower in numpy: ask for them by name).
DEFAULT_STUDY = ("gptq_w2g128", "gptq_w2g64", "glvq_ro", "glvq_np_it0", "glvq_np", "glvq_np_natural_order",
                 "glvq_np_col_scale", "glvq_np_salience25", "glvq_exact")


def layer_study(model, H, layers=STUDY_LAYERS, variants=DEFAULT_STUDY):
    """Relative layer loss ``tr(E H Eᵀ) / tr(W H Wᵀ)`` and bits/weight per variant and layer."""
    from llm_adapter.methods.uniform import quantize_weight
    from llm_adapter.methods.uniform import QuantSpec

    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        W = mods[name].weight.detach().double().numpy()
        row = {}
        for v in variants:
            kind, fields, backend = STUDY[v]
            t0 = time.perf_counter()
            if kind == "glvq":
                q = quantize_weight_glvq(W, H[name], spec=GLVQSpec(**fields), backend=backend)
                bpw = q.bits_per_weight
            else:
                q = quantize_weight(W, H[name], None, QuantSpec(method="gptq", **fields), backend=backend)
                bpw = _gptq_bits(fields["bits"], fields["group_size"], W.shape[1])
            row[v] = {"rel_loss": q.stats["rel_loss"], "bits_per_weight": bpw, "time_s": time.perf_counter() - t0}
            logger.info("study %s %s: rel_loss %.4g  bpw %.3f", name, v, q.stats["rel_loss"], bpw)
        out[name] = row
    return out


def study_table(study) -> str:
    variants = list(next(iter(study.values())))
    lines = ["| layer | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, row in study.items():
        lines.append(f"| {name.replace('model.layers.', 'L')} | "
                     + " | ".join(f"{row[v]['rel_loss']:.4f}" for v in variants) + " |")
    lines.append("| bits/weight (first layer) | " + " | ".join(
        f"{next(iter(study.values()))[v]['bits_per_weight']:.3f}" for v in variants) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- results
def _merge(path, key, entry):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        data.setdefault("runs", {})[key] = entry
        write_json_file(path, data)
    return data


def table(data) -> str:
    lines = ["| protocol | calib windows | run | bits/weight | ppl | mean layer rel. loss | quant. time (s) |",
             "|---|---|---|---|---|---|---|"]
    keys = [k for k in data.get("runs", {}) if not k.startswith("study/")]
    for key in sorted(keys, key=lambda k: (k.split("/")[0] != "sequential", k)):
        r = data["runs"][key]
        lines.append(f"| {r['protocol']} | {r['calib_windows']} | {LABELS.get(r['run'], r['run'])} | "
                     f"{r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['mean_rel_loss']:.4f} | "
                     f"{r['quant_time_s']:.0f} |")
    return "\n".join(lines)


NOTES = """\
Bits per weight count everything stored: glvq = 2-bit codes + one fp16 8×8 generator per
128 input columns + one fp16 scale per output row; gptq = 2-bit codes + per group an fp16
scale and a 2-bit zero (the GPTQ checkpoint layout). Protocol `sequential` (the protocol
of `benchmarks/llm_quality.py`): `llm_adapter.quantize_model`, true-sequential, 128
calibration windows × 512 tokens (seed 0), each block's layers quantized from the inputs
of the already-quantized model. Protocol `fp` (cheaper, an earlier session): every layer
quantized from the input Gram of the *float* model (one pass shared by all runs), 32
windows — errors of earlier blocks are not compensated by later ones, harsher for every
method. Evaluation: the standard 32 × 512 held-out windows; float perplexity 40.95.
Encoders of the stored codes: round-off (GLVQ's "Babai rounding"), nearest plane, exact
(Schnorr–Euchner per sub-vector, generator fitted with nearest plane). Quantization times
are wall times on the shared 2-core CPU (other work ran beside some runs). The sequential
gptq rows reproduce `benchmarks/llm_quality.py` (W2 g128 5100.5 vs 5101; W2 g64 892.1 vs
909.2 there — same code, float reduction order differs with the thread count/load).
glvq uses `H` only (no joint target): OJBKQ's W2 g128 140.2 there is lower still.
"""


def verdict(data) -> str:
    """One line per protocol: each glvq run against every gptq run with at least its bits."""
    runs = [r for k, r in data.get("runs", {}).items() if not k.startswith("study/")]
    lines = []
    for proto in sorted({r["protocol"] for r in runs}):
        pr = [r for r in runs if r["protocol"] == proto]
        gl = sorted((r for r in pr if r["kind"] == "glvq"), key=lambda r: r["ppl"])
        gp = [r for r in pr if r["kind"] == "gptq"]
        for g in gl:
            rivals = [r for r in gp if r["bits_per_weight"] >= g["bits_per_weight"]]
            if not rivals:
                continue
            best = min(rivals, key=lambda r: r["ppl"])
            word = "below" if g["ppl"] < best["ppl"] else "NOT below"
            lines.append(f"* `{proto}`: {LABELS.get(g['run'], g['run'])} ({g['bits_per_weight']:.3f} b/w) "
                         f"ppl {g['ppl']:.2f} — {word} the best uniform gptq with at least as many bits, "
                         f"{LABELS.get(best['run'], best['run'])} ({best['bits_per_weight']:.3f} b/w) "
                         f"ppl {best['ppl']:.2f}")
    return "\n".join(lines)


def markdown(data) -> str:
    parts = ["## Lattice VQ at 2 bits: glvq vs uniform GPTQ (`benchmarks/lattice_quality.py`)", "",
             NOTES, table(data), "", "At matched bits (target: glvq below uniform gptq):", "", verdict(data)]
    for key, st in sorted(data.get("runs", {}).items()):
        if key.startswith("study/"):
            parts += ["", f"Layer-level study ({st['what']}; calibration {st['calib_windows']} windows), "
                      "relative loss per variant:", "", study_table(st["layers"])]
    return "\n".join(parts) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["glvq_np", "gptq_w2g128", "gptq_w2g64"],
                    choices=list(RUNS) + ["none"])
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
    ap.add_argument("--checkpoint-root", type=Path, default=None,
                    help="sequential protocol: per-layer checkpoints under DIR/c<windows>_<run>, so a killed "
                         "run restarted with the same arguments resumes")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--doc", type=Path, default=None,
                    help=f"write the tables into this markdown file between markers (e.g. {DEFAULT_DOC.relative_to(ROOT)})")
    ap.add_argument("--layer-study", nargs="*", choices=list(STUDY), default=None,
                    help="also run the layer-level study (fp protocol H) and store it in the JSON; "
                         "optionally name the variants (default: DEFAULT_STUDY)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.table_only:
        data = json.loads(args.out.read_text())
        print(markdown(data))
        if args.doc:
            write_doc(args.doc, markdown(data), BEGIN, END)
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
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    for run in [] if args.runs == ["none"] else args.runs:
        t0 = time.perf_counter()
        if args.protocol == "fp":
            res = quantize_fp(model, H, run, float_state, args.targets)
        else:
            ckpt = None if args.checkpoint_root is None else args.checkpoint_root / f"c{args.calib_windows}_{run}"
            res = quantize_sequential(model, calib, run, float_state, args.batch_size, args.targets, ckpt)
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
    if args.layer_study is not None:
        if H is None or args.targets != ["*"]:
            H = collect_hessians(model, calib, args.cache_dir, args.batch_size)
        model.load_state_dict(float_state)
        study = layer_study(model, H, variants=tuple(args.layer_study) or DEFAULT_STUDY)
        data = _merge(args.out, f"study/c{args.calib_windows}", {
            "protocol": "fp", "calib_windows": args.calib_windows, "layers": study,
            "what": "relative layer loss tr(E H E^T)/tr(W H W^T), H damped 1%, float-model inputs"})
        print(study_table(study))
    if FLOAT_JSON.exists():
        fl = json.loads(FLOAT_JSON.read_text()).get("float", {}).get("ppl")
        if fl:
            logger.info("float perplexity (benchmarks/llm_quality.py): %.3f", fl)
    print(markdown(data))
    if args.doc:
        write_doc(args.doc, markdown(data), BEGIN, END)


if __name__ == "__main__":
    main()

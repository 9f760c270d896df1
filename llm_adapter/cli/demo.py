"""``llm-adapter demo``: quantize the default model with every uniform-grid method and
compare perplexities with the float model."""

from __future__ import annotations

import copy
import time

from .. import methods
from ..methods.uniform import uniform_methods
from .argtypes import positive_int
from .common import fmt, load_model_or_fail, load_text_or_fail, make_windows, model_source, table

__all__ = ["DEMO_BITS", "DEMO_CALIB_WINDOWS", "DEMO_EVAL_WINDOWS", "DEMO_GROUP_SIZE", "DEMO_SEQLEN", "add_parser",
           "run"]

#: The demo's settings (``make demo``): what fits ~15 minutes on a 2-core CPU.
DEMO_BITS = 3
DEMO_GROUP_SIZE = 128
DEMO_CALIB_WINDOWS = 16
DEMO_SEQLEN = 512
DEMO_EVAL_WINDOWS = 32
_BACKENDS = ("auto", "numpy", "numba", "cupy")


def add_parser(sub, common) -> None:
    """Add the ``demo`` command to the subparsers `sub` (its methods: the registered
    uniform-grid ones)."""
    choices = uniform_methods()
    d = sub.add_parser("demo", parents=[common], help="quantize the default model with every method and compare perplexities",
                       description=f"Quantize the default model at {DEMO_BITS}-bit g{DEMO_GROUP_SIZE} with "
                                   f"{', '.join(choices)} and print a perplexity table against the float model.")
    d.add_argument("--model", default=None, help="model (default: the built-in default model)")
    d.add_argument("--methods", nargs="+", choices=choices, default=list(choices), help="methods to run")
    d.add_argument("--calib", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="calibration text (default: the shakespeare calibration plays)")
    d.add_argument("--text", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="evaluation text (default: the held-out shakespeare plays)")
    d.add_argument("--calib-windows", type=positive_int, default=DEMO_CALIB_WINDOWS,
                   help=f"calibration windows (default {DEMO_CALIB_WINDOWS}; the benchmark protocol uses 128)")
    d.add_argument("--seqlen", type=positive_int, default=DEMO_SEQLEN,
                   help=f"tokens per calibration and evaluation window (default {DEMO_SEQLEN})")
    d.add_argument("--windows", type=positive_int, default=DEMO_EVAL_WINDOWS,
                   help=f"evaluation windows (default {DEMO_EVAL_WINDOWS})")
    d.add_argument("--backend", choices=_BACKENDS, default="auto", help="bils solver backend (default auto)")
    d.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    d.set_defaults(func=run)


def run(args) -> int:
    """Run ``demo``; returns the exit status."""
    from ..calibration import quantize_model
    from ..data import calibration_windows, evaluation_windows
    from ..evaluate import perplexity

    t_start = time.perf_counter()
    source = model_source(args.model)
    print(f"demo: {source}, {DEMO_BITS}-bit, group size {DEMO_GROUP_SIZE}, asymmetric min-max grid, "
          f"methods {', '.join(args.methods)}", flush=True)
    calib_name = "the shakespeare calibration plays" if args.calib == ["shakespeare"] else " ".join(args.calib)
    eval_name = ("the held-out plays (Hamlet, Macbeth, Othello, Lear)" if args.text == ["shakespeare"]
                 else " ".join(args.text))
    reduced = args.calib_windows < 128
    print(f"calibration: {args.calib_windows} random windows x {args.seqlen} tokens of {calib_name} "
          f"(seed {args.seed})" + ("; the benchmark protocol (benchmarks/llm_quality.py, docs/results.md) "
                                   "uses 128 x 512, reduced here to fit ~15 minutes on a 2-core CPU"
                                   if reduced else ""), flush=True)
    print(f"evaluation: {args.windows} non-overlapping windows x {args.seqlen} tokens of {eval_name}, "
          "perplexity = exp(mean token NLL)", flush=True)
    calib_text = load_text_or_fail(args.calib, "calibration", "--calib")
    eval_text = load_text_or_fail(args.text, "evaluation", "--text")
    float_model, tok = load_model_or_fail(source)
    calib = make_windows(calibration_windows, "--calib-windows/--seqlen", tok, calib_text,
                     n_windows=args.calib_windows, seqlen=args.seqlen, seed=args.seed)
    evalw = make_windows(evaluation_windows, "--windows/--seqlen", tok, eval_text, n_windows=args.windows,
                     seqlen=args.seqlen)

    rows = []
    print("[float] evaluating the float model", flush=True)
    t0 = time.perf_counter()
    base = perplexity(float_model, evalw, batch_size=4)
    rows.append(("float (fp32)", base.ppl, None, None, time.perf_counter() - t0))
    print(f"[float] perplexity {base.ppl:.3f}", flush=True)
    for i, method in enumerate(args.methods, 1):
        spec = methods.get(method).spec_type(bits=DEMO_BITS, group_size=DEMO_GROUP_SIZE, method=method)
        model = copy.deepcopy(float_model)
        print(f"[{i}/{len(args.methods)}] {method}: quantizing", flush=True)
        t0 = time.perf_counter()
        layers = quantize_model(model, calib, spec, seed=args.seed, backend=args.backend, batch_size=4)
        t_q = time.perf_counter() - t0
        losses = [l.stats.get("rel_loss") for l in layers.values()]
        mean_rel = (sum(losses) / len(losses)) if losses and all(v is not None for v in losses) else None
        print(f"[{i}/{len(args.methods)}] {method}: {len(layers)} layers in {t_q:.1f} s; evaluating", flush=True)
        t0 = time.perf_counter()
        res = perplexity(model, evalw, batch_size=4)
        print(f"[{i}/{len(args.methods)}] {method}: perplexity {res.ppl:.3f}", flush=True)
        rows.append((method, res.ppl, mean_rel, t_q, time.perf_counter() - t0))
        del model

    print()
    print(f"W{DEMO_BITS} g{DEMO_GROUP_SIZE}, {source}, calibration {args.calib_windows} x {args.seqlen}, "
          f"evaluation {args.windows} x {args.seqlen} tokens")
    header = ("method", "perplexity", "vs float", "mean rel loss", "quantize s", "evaluate s")
    lines = []
    for name, ppl, rel, tq, te in rows:
        ratio = "" if name.startswith("float") else f"{ppl / base.ppl:.3f}x"
        lines.append((name, f"{ppl:.3f}", ratio, fmt(rel, ".4g", "" if name.startswith("float") else "-"),
                      fmt(tq, ".1f", ""), fmt(te, ".1f", "")))
    print(table(header, lines))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")
    return 0

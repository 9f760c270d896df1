"""``llm-adapter``: quantize, evaluate, generate, demo.

::

    llm-adapter quantize --method gptq --bits 3 --group-size 128 --out q3/
    llm-adapter quantize --method glvq --bits 2 --lattice-dim 8 --out w2-glvq/
    llm-adapter evaluate --quantized q3/
    llm-adapter generate --quantized q3/ --prompt "To be, or not to be"
    llm-adapter demo

Errors in the arguments (an unknown model, a missing corpus or file, bad bits or group
options) exit with status 2 and a message naming the flag. Logging goes to stderr
(``-v`` for per-layer details), tables and results to stdout.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["CLIError", "build_parser", "layer_table", "load_quantized_model", "main"]

logger = logging.getLogger("llm_adapter.cli")

_METHODS = ("rtn", "gptq", "ojbkq", "regcal")
#: ``quantize --method`` also takes the lattice method (its own options: --lattice-dim, --encode...).
_QUANTIZE_METHODS = _METHODS + ("glvq",)
_BITS = (2, 3, 4, 8)
_BACKENDS = ("auto", "numpy", "numba", "cupy")

#: The demo's settings (``make demo``): what fits ~15 minutes on a 2-core CPU.
DEMO_BITS = 3
DEMO_GROUP_SIZE = 128
DEMO_CALIB_WINDOWS = 16
DEMO_SEQLEN = 512
DEMO_EVAL_WINDOWS = 32


class CLIError(Exception):
    """A user error: printed as ``llm-adapter: error: <message>``, exit status 2."""


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _group_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 (per-channel) or a positive integer, got {text!r}") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"expected -1 (per-channel) or a positive integer, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-adapter`` argument parser."""
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="llm-adapter",
        description="Low-bit quantization of causal LMs with BILS solvers (bils).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    common = argparse.ArgumentParser(add_help=False)  # -v also after the command
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def model_args(p, *, quantized: bool):
        help_model = (
            f"model to load: a built-in name (default {DEFAULT_MODEL!r}), a local directory saved with "
            "save_pretrained, a .gguf file, or a Hugging Face hub id"
        )
        if quantized:
            help_model += "; with --quantized: where to find the base model (default: the one recorded there)"
        p.add_argument("--model", default=None, help=help_model)
        if quantized:
            p.add_argument("--quantized", metavar="DIR", default=None,
                           help="a directory written by `quantize --out`")

    q = sub.add_parser("quantize", parents=[common], help="quantize a model's linear layers and save them",
                       description="Quantize the linear layers of the decoder blocks and save them "
                                   "(native format, optionally a GPTQ checkpoint).")
    model_args(q, quantized=False)
    q.add_argument("--method", choices=_QUANTIZE_METHODS, default="gptq",
                   help="quantization method (default gptq); glvq = grouped lattice VQ, one generator per "
                        "--group-size input columns")
    q.add_argument("--bits", type=int, choices=_BITS, default=4, help="code width (default 4)")
    q.add_argument("--group-size", type=_group_size, default=128,
                   help="input columns per group, -1 for per-channel (default 128)")
    q.add_argument("--sym", action="store_true", help="symmetric grid (zero point 2**(bits-1))")
    q.add_argument("--clip", choices=("minmax", "mse"), default="minmax", help="grid search (default minmax)")
    q.add_argument("--damp", type=_nonneg_float, default=0.01, help="Hessian damping, fraction of mean diag (default 0.01)")
    q.add_argument("--calib", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="calibration text: a corpus name (shakespeare, wikitext2, c4) or text file(s)")
    lat = q.add_argument_group("glvq (with --method glvq)")
    lat.add_argument("--lattice-dim", type=_positive_int, default=8,
                     help="lattice dimension d in {2, 4, 8, 16, 32} (default 8)")
    lat.add_argument("--encode", choices=("nearest_plane", "round_off", "kbest", "exact"), default="exact",
                     help="encoder of the stored codes (default exact; the generator is fitted with nearest plane)")
    lat.add_argument("--fit-iters", type=int, default=20, help="generator-fitting iterations per group (default 20)")
    lat.add_argument("--salience-frac", type=_nonneg_float, default=0.0,
                     help="fraction of groups coded with bits+1 (as many get bits-1; default 0)")
    q.add_argument("--calib-windows", type=_positive_int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per calibration window (default 2048)")
    q.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass (default 8)")
    q.add_argument("--seed", type=int, default=0, help="seed of the windows and of sampling (default 0)")
    q.add_argument("--targets", nargs="+", default=["*"], metavar="PATTERN",
                   help="fnmatch patterns of the linear layers to quantize (default: all in the blocks)")
    q.add_argument("--out", metavar="DIR", default=None, help="write the quantized layers here (native format)")
    q.add_argument("--export-gptq", metavar="DIR", default=None, help="also write a GPTQ checkpoint here")
    q.add_argument("--gptq-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="GPTQ checkpoint format (default gptq = v1, stores zero - 1)")
    q.add_argument("--checkpoint", "--resume", dest="checkpoint", metavar="DIR", default=None,
                   help="per-layer checkpoints; rerunning with the same DIR resumes where it stopped")
    q.add_argument("--backend", choices=_BACKENDS, default="auto", help="bils solver backend (default auto)")
    q.add_argument("--overwrite", action="store_true", help="replace existing --out / --export-gptq directories")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", parents=[common], help="perplexity of a float or quantized model",
                       description="Perplexity with the GPTQ protocol: non-overlapping windows, exp(mean token NLL).")
    model_args(e, quantized=True)
    _eval_args(e)
    e.set_defaults(func=cmd_evaluate)

    g = sub.add_parser("generate", parents=[common], help="generate text from a prompt")
    model_args(g, quantized=True)
    g.add_argument("--prompt", required=True, help="the prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=50, help="tokens to generate (default 50)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=_nonneg_float, default=1.0, help="sampling temperature (with --sample)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (with --sample)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", parents=[common], help="quantize the default model with every method and compare perplexities",
                       description=f"Quantize the default model at {DEMO_BITS}-bit g{DEMO_GROUP_SIZE} with "
                                   "rtn, gptq, ojbkq, regcal and print a perplexity table against the float model.")
    d.add_argument("--model", default=None, help="model (default: the built-in default model)")
    d.add_argument("--methods", nargs="+", choices=_METHODS, default=list(_METHODS), help="methods to run")
    d.add_argument("--calib", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="calibration text (default: the shakespeare calibration plays)")
    d.add_argument("--text", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="evaluation text (default: the held-out shakespeare plays)")
    d.add_argument("--calib-windows", type=_positive_int, default=DEMO_CALIB_WINDOWS,
                   help=f"calibration windows (default {DEMO_CALIB_WINDOWS}; the benchmark protocol uses 128)")
    d.add_argument("--seqlen", type=_positive_int, default=DEMO_SEQLEN,
                   help=f"tokens per calibration and evaluation window (default {DEMO_SEQLEN})")
    d.add_argument("--windows", type=_positive_int, default=DEMO_EVAL_WINDOWS,
                   help=f"evaluation windows (default {DEMO_EVAL_WINDOWS})")
    d.add_argument("--backend", choices=_BACKENDS, default="auto", help="bils solver backend (default auto)")
    d.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    d.set_defaults(func=cmd_demo)
    return parser


def _eval_args(p):
    p.add_argument("--text", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="evaluation text: a corpus name (its evaluation split) or text file(s) (default shakespeare)")
    p.add_argument("--windows", type=_positive_int, default=32, help="evaluation windows (default 32)")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="scored tokens per window (default 512)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass (default 4)")


# --------------------------------------------------------------------------- shared steps


def _load_text(source: list[str], split: str, flag: str) -> str:
    from .data import load_text

    arg = source[0] if len(source) == 1 else source
    try:
        return load_text(arg, split=split)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as err:
        raise CLIError(f"{flag}: {err}") from err


def _model_source(name: str | None) -> str:
    """What to record and load: built-in names and hub ids as is, local paths absolute."""
    from .models import BUILTIN_MODELS, DEFAULT_MODEL

    if name is None:
        return DEFAULT_MODEL
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def _load_model(source: str, flag: str = "--model"):
    from .models import load_model

    try:
        return load_model(source)
    except (OSError, ValueError, ImportError, TypeError) as err:  # FileNotFound, ModelNotFound are OSError
        raise CLIError(f"{flag}: cannot load model {source!r}: {err}") from err


def _windows(fn, flag: str, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise CLIError(f"{flag}: {err}") from err


def _check_new_dir(path: str | None, flag: str, overwrite: bool) -> None:
    if path is None:
        return
    p = Path(path)
    if p.exists() and not overwrite:
        raise CLIError(f"{flag}: {str(p)!r} already exists (pass --overwrite to replace it)")
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag}: {str(p)!r} exists and is not a directory")


def load_quantized_model(path: str | os.PathLike, model: str | None = None):
    """Base model + the quantized layers of directory `path` (as :class:`QuantLinear`
    where supported, glvq layers as :class:`LatticeLinear`, else dequantized weights).
    Returns ``(model, tokenizer, meta)``."""
    import torch

    from .formats import QuantizedFormatError, load_quantized
    from .modules import QUANT_LINEAR_BITS, QUANT_LINEAR_GROUP_SIZES, replace_linear

    try:
        layers, meta = load_quantized(path)
    except (FileNotFoundError, QuantizedFormatError) as err:
        raise CLIError(f"--quantized: {err}") from err
    recorded = (meta.get("model") or {}).get("source")
    source = _model_source(model) if model is not None else recorded
    if source is None:
        raise CLIError(f"--quantized: {str(path)!r} does not record its base model; pass --model")
    flag = "--model" if model is not None else "--quantized (recorded base model)"
    net, tok = _load_model(source, flag)
    saved_cfg = (meta.get("model") or {}).get("config") or {}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if key in saved_cfg and getattr(net.config, key, saved_cfg[key]) != saved_cfg[key]:
            raise CLIError(
                f"{flag}: model {source!r} has {key} = {getattr(net.config, key)}, the quantized layers "
                f"were made for {saved_cfg[key]}"
            )
    modules = dict(net.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise CLIError(f"{flag}: model {source!r} has no module(s) {missing[:3]} named in {str(path)!r}")
    from .lattice_method import LatticeLayer

    packable = {
        n: l for n, l in layers.items()
        if isinstance(l, LatticeLayer) or (l.bits in QUANT_LINEAR_BITS and l.group_size in QUANT_LINEAR_GROUP_SIZES)
    }
    try:
        replace_linear(net, packable)
    except (KeyError, ValueError) as err:
        raise CLIError(f"--quantized: {err}") from err
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in packable:
                mod = modules[name]
                mod.weight.copy_(torch.from_numpy(layer.dequantize()).to(mod.weight.dtype))
    logger.info("loaded %d quantized layers from %s onto %s", len(layers), path, source)
    return net, tok, meta


def _to_gpu(model):
    """On a CUDA machine: `model` in float16 on the GPU, where its QuantLinear/LatticeLinear
    layers run the packed-weight kernels (llm_adapter.kernels); prints its memory against
    float16. Elsewhere `model` unchanged."""
    import torch

    if not torch.cuda.is_available():
        return model
    from .kernels.torch_ops import model_memory

    model = model.to(device="cuda", dtype=torch.float16)
    mem = model_memory(model)
    print(f"GPU memory of the model: {mem['bytes'] / 2**20:.1f} MiB = {mem['ratio']:.3f} x its float16 size "
          f"({mem['fp16_bytes'] / 2**20:.1f} MiB); allocated on the device: "
          f"{torch.cuda.memory_allocated() / 2**20:.1f} MiB")
    return model


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    try:
        value = float(value)
        return missing if value != value else format(value, spec)  # NaN: not applicable
    except (TypeError, ValueError):
        return str(value)


def layer_table(layers) -> str:
    """The per-layer table: layer, loss, rel loss, Babai bound, clipped %, time."""
    header = ("layer", "loss", "rel loss", "Babai bound", "clipped %", "time s")
    rows = []
    for name, layer in layers.items():
        st = layer.stats
        clipped = st.get("clipped_frac")
        rows.append((
            name,
            _fmt(st.get("loss"), ".4g"),
            _fmt(st.get("rel_loss"), ".4g"),
            _fmt(st.get("babai_bound"), ".4g"),
            _fmt(None if clipped is None else 100 * float(clipped), ".2f"),
            _fmt(st.get("time"), ".2f"),
        ))
    total_time = sum(float(l.stats.get("time") or 0.0) for l in layers.values())
    losses = [l.stats.get("loss") for l in layers.values()]
    total_loss = sum(float(v) for v in losses if v is not None) if any(v is not None for v in losses) else None
    rows.append(("total", _fmt(total_loss, ".4g"), "", "", "", _fmt(total_time, ".2f")))
    return _table(header, rows[:-1], footer=rows[-1])


def _table(header, rows, footer=None) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    everything = [header, *rows, *([footer] if footer is not None else [])]
    widths = [max(len(str(r[i])) for r in everything) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r))

    sep = "  ".join("-" * w for w in widths)
    out = [line(header), sep, *(line(r) for r in rows)]
    if footer is not None:
        out += [sep, line(footer)]
    return "\n".join(out)


# --------------------------------------------------------------------------- commands


def _quantize_spec(args):
    """QuantSpec (uniform methods) or GLVQSpec (``--method glvq``); errors name the flag."""
    from .lattice_method import GLVQSpec
    from .spec import QuantSpec

    if args.method == "glvq":
        if args.group_size == -1:
            raise CLIError("--group-size: glvq needs a positive group size (a multiple of --lattice-dim), not -1")
        fields = {"bits": "--bits", "d": "--lattice-dim", "group_size": "--group-size", "encode": "--encode",
                  "n_iter": "--fit-iters", "salience_frac": "--salience-frac", "damp": "--damp"}
        try:
            return GLVQSpec(bits=args.bits, d=args.lattice_dim, group_size=args.group_size, encode=args.encode,
                            fit_encode="nearest_plane", n_iter=args.fit_iters, salience_frac=args.salience_frac,
                            damp=args.damp)
        except ValueError as err:
            flag = next((f for k, f in fields.items() if str(err).startswith(f"`{k}`")), "--method")
            raise CLIError(f"{flag}: {err}") from err
    try:
        return QuantSpec(bits=args.bits, group_size=args.group_size, sym=args.sym, clip=args.clip,
                         method=args.method, damp=args.damp)
    except ValueError as err:
        flag = next((f for f in ("bits", "group_size", "sym", "clip", "method", "damp") if f"`{f}`" in str(err)), None)
        raise CLIError(f"--{(flag or 'bits').replace('_', '-')}: {err}") from err


def cmd_quantize(args) -> int:
    from .calibrate import quantize_model
    from .data import calibration_windows

    if args.out is None and args.export_gptq is None:
        raise CLIError("--out: give --out DIR and/or --export-gptq DIR, or the result is lost")
    _check_new_dir(args.out, "--out", args.overwrite)
    _check_new_dir(args.export_gptq, "--export-gptq", args.overwrite)
    spec = _quantize_spec(args)
    if args.method == "glvq" and args.export_gptq is not None:
        raise CLIError("--export-gptq: glvq layers have no GPTQ layout; use --out (the native format)")
    text = _load_text(args.calib, "calibration", "--calib")
    source = _model_source(args.model)
    model, tok = _load_model(source)
    windows = _windows(calibration_windows, "--calib-windows/--seqlen", tok, text,
                       n_windows=args.calib_windows, seqlen=args.seqlen, seed=args.seed)
    if args.method == "glvq":
        what = (f"{args.bits}-bit lattice codes, d = {spec.d}, one generator per {spec.group_size} columns, "
                f"encode {spec.encode}")
    else:
        what = f"{args.bits}-bit, group size {args.group_size}, {'sym' if args.sym else 'asym'}"
    print(f"quantizing {source} with {args.method}: {what}, calibration {args.calib_windows} x {args.seqlen} tokens",
          flush=True)
    t0 = time.perf_counter()
    try:
        layers = quantize_model(model, windows, spec, targets=tuple(args.targets), batch_size=args.batch_size,
                                seed=args.seed, checkpoint_dir=args.checkpoint, backend=args.backend,
                                rtn_calibrate=True)
    except ValueError as err:
        if "targets" in str(err):
            raise CLIError(f"--targets: {err}") from err
        if args.checkpoint is not None and "checkpoint_dir" in str(err):
            raise CLIError(f"--checkpoint: {err}") from err
        raise
    elapsed = time.perf_counter() - t0
    print(layer_table(layers))
    print(f"{len(layers)} layers quantized in {elapsed:.1f} s")
    if args.method == "glvq":
        bits = sum(l.storage_bits() for l in layers.values())
        print(f"storage: {bits / sum(l.codes.size for l in layers.values()):.4f} bits per weight "
              "(codes + fp16 generators and scales)")
    model_info = {
        "source": source,
        "model_type": getattr(model.config, "model_type", None),
        "config": model.config.to_dict(),
        "calibration": {"text": list(args.calib), "windows": args.calib_windows, "seqlen": args.seqlen,
                        "seed": args.seed},
    }
    if args.out is not None:
        from .formats import save_quantized

        path = save_quantized(args.out, layers, spec.to_dict(), model_info, overwrite=args.overwrite)
        print(f"wrote {path}")
    if args.export_gptq is not None:
        from .formats import GPTQExportError, export_gptq

        try:
            path = export_gptq(model, layers, args.export_gptq, tokenizer=tok, damp_percent=args.damp,
                               checkpoint_format=args.gptq_format, overwrite=args.overwrite)
        except GPTQExportError as err:
            raise CLIError(f"--export-gptq: {err}") from err
        print(f"wrote GPTQ checkpoint {path}")
    return 0


def cmd_evaluate(args) -> int:
    from .data import evaluation_windows
    from .evaluate import perplexity

    text = _load_text(args.text, "evaluation", "--text")  # before the model: fail fast
    if args.quantized is not None:
        model, tok, _ = load_quantized_model(args.quantized, args.model)
        model = _to_gpu(model)
        label = f"quantized {args.quantized}"
    else:
        source = _model_source(args.model)
        model, tok = _load_model(source)
        label = source
    windows = _windows(evaluation_windows, "--windows/--seqlen", tok, text, n_windows=args.windows,
                       seqlen=args.seqlen)
    res = perplexity(model, windows, batch_size=args.batch_size)
    print(f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.5f} over {res.n_tokens} tokens; {label})")
    return 0


def cmd_generate(args) -> int:
    import torch

    if args.quantized is not None:
        model, tok, _ = load_quantized_model(args.quantized, args.model)
        model = _to_gpu(model)
    else:
        model, tok = _load_model(_model_source(args.model))
    enc = tok(args.prompt, return_tensors="pt").to(next(model.parameters()).device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if args.sample:
        kwargs["temperature"] = args.temperature
        # generate() takes no generator: it samples from torch's global one, so the
        # application (not the library) seeds it here.
        torch.manual_seed(args.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_demo(args) -> int:
    from .calibrate import quantize_model
    from .data import calibration_windows, evaluation_windows
    from .evaluate import perplexity
    from .spec import QuantSpec

    t_start = time.perf_counter()
    source = _model_source(args.model)
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
    calib_text = _load_text(args.calib, "calibration", "--calib")
    eval_text = _load_text(args.text, "evaluation", "--text")
    float_model, tok = _load_model(source)
    calib = _windows(calibration_windows, "--calib-windows/--seqlen", tok, calib_text,
                     n_windows=args.calib_windows, seqlen=args.seqlen, seed=args.seed)
    evalw = _windows(evaluation_windows, "--windows/--seqlen", tok, eval_text, n_windows=args.windows,
                     seqlen=args.seqlen)

    rows = []
    print("[float] evaluating the float model", flush=True)
    t0 = time.perf_counter()
    base = perplexity(float_model, evalw, batch_size=4)
    rows.append(("float (fp32)", base.ppl, None, None, time.perf_counter() - t0))
    print(f"[float] perplexity {base.ppl:.3f}", flush=True)
    for i, method in enumerate(args.methods, 1):
        spec = QuantSpec(bits=DEMO_BITS, group_size=DEMO_GROUP_SIZE, method=method)
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
        lines.append((name, f"{ppl:.3f}", ratio, _fmt(rel, ".4g", "" if name.startswith("float") else "-"),
                      _fmt(tq, ".1f", ""), _fmt(te, ".1f", "")))
    print(_table(header, lines))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")
    return 0


# --------------------------------------------------------------------------- entry point


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm_adapter").setLevel(level)
    logging.getLogger("bils").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for argument errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"llm-adapter {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

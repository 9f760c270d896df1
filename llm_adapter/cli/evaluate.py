"""``llm-adapter evaluate``: perplexity of a float or quantized model."""

from __future__ import annotations

from .argtypes import positive_int
from .common import load_model_or_fail, load_quantized_model, to_gpu, load_text_or_fail, make_windows, model_source

__all__ = ["add_parser", "run"]


def add_parser(sub, common) -> None:
    """Add the ``evaluate`` command to the subparsers `sub`."""
    from .main import model_args

    e = sub.add_parser("evaluate", parents=[common], help="perplexity of a float or quantized model",
                       description="Perplexity with the GPTQ protocol: non-overlapping windows, exp(mean token NLL).")
    model_args(e, quantized=True)
    e.add_argument("--text", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="evaluation text: a corpus name (its evaluation split) or text file(s) (default shakespeare)")
    e.add_argument("--windows", type=positive_int, default=32, help="evaluation windows (default 32)")
    e.add_argument("--seqlen", type=positive_int, default=512, help="scored tokens per window (default 512)")
    e.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    e.set_defaults(func=run)


def run(args) -> int:
    """Run ``evaluate``; returns the exit status."""
    from ..data import evaluation_windows
    from ..evaluate import perplexity

    text = load_text_or_fail(args.text, "evaluation", "--text")  # before the model: fail fast
    if args.quantized is not None:
        model, tok, _ = load_quantized_model(args.quantized, args.model)
        model = to_gpu(model)
        label = f"quantized {args.quantized}"
    else:
        source = model_source(args.model)
        model, tok = load_model_or_fail(source)
        label = source
    windows = make_windows(evaluation_windows, "--windows/--seqlen", tok, text, n_windows=args.windows,
                       seqlen=args.seqlen)
    res = perplexity(model, windows, batch_size=args.batch_size)
    print(f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.5f} over {res.n_tokens} tokens; {label})")
    return 0

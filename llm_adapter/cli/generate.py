"""``llm-adapter generate``: generate text from a prompt."""

from __future__ import annotations

from .argtypes import nonneg_float, positive_int
from .common import load_model_or_fail, load_quantized_model, to_gpu, model_source

__all__ = ["add_parser", "run"]


def add_parser(sub, common) -> None:
    """Add the ``generate`` command to the subparsers `sub`."""
    from .main import model_args

    g = sub.add_parser("generate", parents=[common], help="generate text from a prompt")
    model_args(g, quantized=True)
    g.add_argument("--prompt", required=True, help="the prompt")
    g.add_argument("--max-new-tokens", type=positive_int, default=50, help="tokens to generate (default 50)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=nonneg_float, default=1.0, help="sampling temperature (with --sample)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (with --sample)")
    g.set_defaults(func=run)


def run(args) -> int:
    """Run ``generate``; returns the exit status."""
    import torch

    if args.quantized is not None:
        model, tok, _ = load_quantized_model(args.quantized, args.model)
        model = to_gpu(model)
    else:
        model, tok = load_model_or_fail(model_source(args.model))
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

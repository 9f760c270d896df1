"""What the commands share: the user-error type, loading text and models, tables."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["CLIError", "LAYER_HEADER", "check_new_dir", "fmt", "layer_row", "layer_table", "load_model_or_fail", "load_quantized_model",
           "load_text_or_fail", "make_windows", "model_source", "table"]

logger = logging.getLogger("llm_adapter.cli")


class CLIError(Exception):
    """A user error: printed as ``llm-adapter <command>: error: <message>``, exit status 2.

    Parameters
    ----------
    flag : str
        The command-line option the error is about (``"--bits"``), or ``""``.
    message : str
        What is wrong; printed after the flag.

    Examples
    --------
    >>> err = CLIError("--bits", "`bits` must be an int in [2, 8], got 9")
    >>> err.flag, str(err)
    ('--bits', '--bits: `bits` must be an int in [2, 8], got 9')
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}" if flag else message)
        self.flag = flag


def load_text_or_fail(source: list[str], split: str, flag: str) -> str:
    """:func:`llm_adapter.data.load_text`; errors become :class:`CLIError` on `flag`."""
    from ..data import load_text

    arg = source[0] if len(source) == 1 else source
    try:
        return load_text(arg, split=split)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as err:
        raise CLIError(flag, f"{err}") from err


def model_source(name: str | None) -> str:
    """What to record and load: built-in names and hub ids as is, local paths absolute."""
    from ..models import BUILTIN_MODELS, DEFAULT_MODEL

    if name is None:
        return DEFAULT_MODEL
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def load_model_or_fail(source: str, flag: str = "--model"):
    """:func:`llm_adapter.models.load_model`; errors become :class:`CLIError` on `flag`."""
    from ..models import load_model

    try:
        return load_model(source)
    except (OSError, ValueError, ImportError, TypeError) as err:  # FileNotFound, ModelNotFound are OSError
        raise CLIError(flag, f"cannot load model {source!r}: {err}") from err


def make_windows(fn, flag: str, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a window builder); errors become :class:`CLIError` on `flag`."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise CLIError(flag, f"{err}") from err


def check_new_dir(path: str | None, flag: str, overwrite: bool) -> None:
    """:class:`CLIError` on `flag` if `path` exists (and not `overwrite`) or is not a directory."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not overwrite:
        raise CLIError(flag, f"{str(p)!r} already exists (pass --overwrite to replace it)")
    if p.exists() and not p.is_dir():
        raise CLIError(flag, f"{str(p)!r} exists and is not a directory")


def load_quantized_model(path: str | os.PathLike, model: str | None = None):
    """Base model + the quantized layers of directory `path`: each layer as its method's
    torch module where that module supports it (:mod:`llm_adapter.nn`), else as dequantized
    weights. Returns ``(model, tokenizer, meta)``."""
    from .. import methods
    from ..formats import QuantizedFormatError, load_quantized
    from ..nn import replace_linear

    try:
        layers, meta = load_quantized(path)
    except (FileNotFoundError, QuantizedFormatError) as err:
        raise CLIError("--quantized", f"{err}") from err
    recorded = (meta.get("model") or {}).get("source")
    source = model_source(model) if model is not None else recorded
    if source is None:
        raise CLIError("--quantized", f"{str(path)!r} does not record its base model; pass --model")
    flag = "--model" if model is not None else "--quantized (recorded base model)"
    net, tok = load_model_or_fail(source, flag)
    saved_cfg = (meta.get("model") or {}).get("config") or {}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if key in saved_cfg and getattr(net.config, key, saved_cfg[key]) != saved_cfg[key]:
            raise CLIError(
                flag, f"model {source!r} has {key} = {getattr(net.config, key)}, the quantized layers "
                f"were made for {saved_cfg[key]}"
            )
    from ..nn.fused import layer_target, write_dequantized

    modules = dict(net.named_modules())
    missing = [n for n in layers if layer_target(modules, n)[0] is None]
    if missing:
        raise CLIError(flag, f"model {source!r} has no module(s) {missing[:3]} named in {str(path)!r}")
    packable = {n: l for n, l in layers.items() if methods.for_layer(l).module_class().supports(l)}
    try:
        replace_linear(net, packable)
    except (KeyError, ValueError) as err:
        raise CLIError("--quantized", f"{err}") from err
    try:
        write_dequantized(net, {n: l for n, l in layers.items() if n not in packable})
    except (KeyError, ValueError) as err:
        raise CLIError("--quantized", f"{err}") from err
    logger.info("loaded %d quantized layers from %s onto %s", len(layers), path, source)
    return net, tok, meta


def to_gpu(model):
    """On a CUDA machine: `model` in float16 on the GPU, where its QuantLinear/LatticeLinear
    layers run the packed-weight kernels (llm_adapter.kernels); prints its memory against
    float16. Elsewhere `model` unchanged."""
    import torch

    if not torch.cuda.is_available():
        return model
    from ..kernels.torch_ops import model_memory

    model = model.to(device="cuda", dtype=torch.float16)
    mem = model_memory(model)
    print(f"GPU memory of the model: {mem['bytes'] / 2**20:.1f} MiB = {mem['ratio']:.3f} x its float16 size "
          f"({mem['fp16_bytes'] / 2**20:.1f} MiB); allocated on the device: "
          f"{torch.cuda.memory_allocated() / 2**20:.1f} MiB")
    return model


def fmt(value, spec: str, missing: str = "-") -> str:
    """`value` formatted with `spec`; `missing` for None and NaN."""
    if value is None:
        return missing
    try:
        value = float(value)
        return missing if value != value else format(value, spec)  # NaN: not applicable
    except (TypeError, ValueError):
        return str(value)


#: Columns of the per-layer table (:func:`layer_row`).
LAYER_HEADER = ("layer", "loss", "rel loss", "vs GPTQ", "Babai bound", "clipped %", "alpha", "tokens", "time s")


def layer_row(name, layer) -> tuple:
    """One row of the per-layer table, from ``layer.stats``: loss, relative loss, loss over
    the Babai/GPTQ baseline's (``1`` for gptq itself; from ``stats["babai_loss"]`` where a
    method records it, else ``-``), Babai's bound, clipped %, α, routed tokens (MoE experts,
    ``*`` when the shared statistics were used) and seconds."""
    st = layer.stats
    clipped = st.get("clipped_frac")
    loss = st.get("loss")
    base = loss if st.get("method") == "gptq" else st.get("babai_loss")
    ratio = None if loss is None or not base else float(loss) / float(base)
    tokens = st.get("tokens")
    tok = "-" if tokens is None else f"{int(tokens)}{'*' if st.get('fallback') else ''}"
    return (
        name,
        fmt(loss, ".4g"),
        fmt(st.get("rel_loss"), ".4g"),
        fmt(ratio, ".3f"),
        fmt(st.get("babai_bound"), ".4g"),
        fmt(None if clipped is None else 100 * float(clipped), ".2f"),
        fmt(st.get("alpha"), ".3g"),
        tok,
        fmt(st.get("time"), ".2f"),
    )


def layer_table(layers) -> str:
    """The per-layer table (:data:`LAYER_HEADER`, rows :func:`layer_row`) with a total line."""
    rows = [layer_row(name, layer) for name, layer in layers.items()]
    total_time = sum(float(l.stats.get("time") or 0.0) for l in layers.values())
    losses = [l.stats.get("loss") for l in layers.values()]
    total_loss = sum(float(v) for v in losses if v is not None) if any(v is not None for v in losses) else None
    footer = ("total", fmt(total_loss, ".4g"), "", "", "", "", "", "", fmt(total_time, ".2f"))
    return table(LAYER_HEADER, rows, footer=footer)


def table(header, rows, footer=None) -> str:
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



"""Quantized layers that are not ``nn.Linear`` modules of the model: transformers ``Conv1D``
(GPT-2: weight ``(in, out)``) and single experts of fused 3-D MoE weights.

A fused expert layer is named ``<experts module>.<parameter>.<e>`` (as written by
:func:`llm_adapter.calibration.quantize_model`), e.g. ``model.layers.0.mlp.experts.down_proj.3``:
expert ``e`` of the 3-D parameter ``down_proj`` (E, H, I). Such layers are stored packed
like any other (:mod:`llm_adapter.formats`) and dequantized on load, on the CPU, into
their slice of the fused parameter (the experts module keeps running its own forward).
"""

from __future__ import annotations

import torch

__all__ = ["expert_slot", "is_conv1d", "layer_target", "write_dequantized"]


def is_conv1d(mod) -> bool:
    """Whether `mod` is a transformers ``Conv1D`` (``y = x W + b``, weight ``(in, out)``)."""
    return type(mod).__name__ == "Conv1D" and getattr(getattr(mod, "weight", None), "ndim", 0) == 2 \
        and hasattr(mod, "nf")


def expert_slot(modules: dict, name: str):
    """``(module, parameter name, expert index)`` when `name` is ``<module>.<3-D parameter>.<e>``
    of a module in `modules` (``dict(model.named_modules())``) with ``e`` in range, else None.

    Examples
    --------
    >>> import torch
    >>> m = torch.nn.Module(); m.w = torch.nn.Parameter(torch.zeros(4, 3, 2))
    >>> expert_slot({"mlp": m}, "mlp.w.3")[1:]
    ('w', 3)
    >>> expert_slot({"mlp": m}, "mlp.w.4") is None
    True
    """
    head, _, idx = name.rpartition(".")
    owner, _, param = head.rpartition(".")
    if not idx.isdigit() or owner not in modules:
        return None
    p = getattr(modules[owner], param, None)
    if not isinstance(p, torch.Tensor) or p.ndim != 3 or int(idx) >= p.shape[0]:
        return None
    return modules[owner], param, int(idx)


def layer_target(modules: dict, name: str):
    """``(kind, (out, in) weight view)`` of the quantized layer `name`: kind ``"linear"``,
    ``"conv1d"`` (the transposed weight) or ``"expert"``; ``(None, None)`` when `name`
    is none of these."""
    mod = modules.get(name)
    if isinstance(mod, torch.nn.Linear):
        return "linear", mod.weight
    if mod is not None and is_conv1d(mod):
        return "conv1d", mod.weight.t()
    slot = expert_slot(modules, name)
    if slot is not None:
        m, param, e = slot
        return "expert", getattr(m, param)[e]
    return None, None


def write_dequantized(model: torch.nn.Module, layers: dict, modules: dict | None = None) -> None:
    """Write each layer's dequantized weight (computed on the CPU) into `model` in place.

    Parameters
    ----------
    model : torch.nn.Module
    layers : dict of str to layer
        Names as in :func:`layer_target` (Linear, Conv1D or fused expert slot).
    modules : dict, optional
        ``dict(model.named_modules())`` if already computed.

    Raises
    ------
    KeyError
        Listing the names that are no such layer of `model`.
    ValueError
        If a shape differs.
    """
    modules = dict(model.named_modules()) if modules is None else modules
    targets = {n: layer_target(modules, n) for n in layers}
    unknown = [n for n, (k, _) in targets.items() if k is None]
    if unknown:
        raise KeyError(f"`layers` names {len(unknown)} layer(s) that `model` does not have: {unknown[:5]}")
    for n, (kind, w) in targets.items():
        if tuple(w.shape) != tuple(layers[n].shape):
            raise ValueError(f"{kind} {n!r} has weight shape {tuple(w.shape)}, the quantized layer "
                             f"{tuple(layers[n].shape)}")
    with torch.no_grad():
        for n, (kind, w) in targets.items():
            w.copy_(torch.from_numpy(layers[n].dequantize()).to(dtype=w.dtype, device=w.device))

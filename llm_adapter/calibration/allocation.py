r"""Mixed precision across layers under a bits-per-weight budget.

Two uniform formats, ``base`` (fewer bits) and ``high``; every layer starts at ``base`` and
layers are moved to ``high`` in order of sensitivity per stored bit while the average
stays within the budget (a greedy knapsack). Everything stored counts: per layer
:math:`b + \lceil n / g\rceil (16 + b) / n` bits per weight (codes, a float16 scale and a
``b``-bit zero point per group of ``g`` columns).

Sensitivity comes from the diagonal of each layer's input Gram,
:math:`h_i = \overline{x_i^2}` (one float forward pass over the calibration windows,
:func:`input_diagonals`), and the layer's grid: with step :math:`\Delta_{jg}` of row
:math:`j` in group :math:`g` (min-max grid), uniform rounding error has variance
:math:`\Delta^2/12`, so the expected relative layer loss of a format is

.. math::

    L = \frac{\sum_j \sum_i h_i \Delta_{j,g(i)}^2 / 12}{\sum_j \sum_i h_i W_{ji}^2},

and a layer's priority is :math:`(L_{base} - L_{high}) / (\text{extra bits})`. Relative
losses are the common currency across layers (a heuristic: it weighs every layer's
output error alike).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..errors import ParameterError
from ..methods.uniform import QuantSpec, compute_grid
from .blocks import DEFAULT_EXCLUDE, hook_module, linear_weight, select_linears
from .experts import ExpertsPart
from .hooks import forward_pre_hooks

__all__ = ["allocate_bits", "format_bits", "input_diagonals", "relative_grid_loss"]

logger = logging.getLogger("llm_adapter.calibration")


def format_bits(spec: QuantSpec, in_features: int) -> float:
    """Stored bits per weight of a uniform format on a layer with `in_features` columns.

    Examples
    --------
    >>> round(format_bits(QuantSpec(bits=2, group_size=128), 576), 4)  # 2 + 5 * 18 / 576
    2.1562
    """
    gs = in_features if spec.group_size == -1 else spec.group_size
    return spec.bits + math.ceil(in_features / gs) * (16 + spec.bits) / in_features


def relative_grid_loss(W, h, spec: QuantSpec) -> float:
    r"""Expected relative loss :math:`L` of rounding `W` (m, n) on `spec`'s min-max grid,
    input second moments `h` (n,) (see the module docstring).

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[-1.0, 0.0, 1.0, 2.0]]); h = np.ones(4)
    >>> relative_grid_loss(W, h, QuantSpec(bits=2))  # step 1: 4 * (1 / 12) / 6
    0.05555555555555555
    """
    W = np.asarray(W, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    scales, _ = compute_grid(W, spec)
    n = W.shape[1]
    gs = n if spec.group_size == -1 else spec.group_size
    g_idx = np.arange(n) // gs
    S = scales.astype(np.float64)[:, g_idx]
    ref = float(np.sum(h[None, :] * W * W))
    return float(np.sum(h[None, :] * S * S) / 12.0 / ref) if ref > 0 else 0.0


def input_diagonals(model, windows, *, targets=("*",), exclude=DEFAULT_EXCLUDE, batch_size=8):
    r"""Mean squared input :math:`h_i = \overline{x_i^2}` of every selected linear layer,
    from one forward pass of the (float) model over `windows`.

    Parameters
    ----------
    model : transformers causal LM
    windows : (n_windows, T) integer torch.Tensor
    targets, exclude : patterns
        As :func:`llm_adapter.calibration.quantize_model` (fused experts are skipped).
    batch_size : int

    Returns
    -------
    dict of str to (n,) ndarray of float64
    """
    layers = {n: m for sel in select_linears(model, targets, exclude, warn=False).values()
              for n, m in sel.items() if not isinstance(m, ExpertsPart)}
    sums = {n: None for n in layers}
    count = {"tokens": 0}

    def hook(name, m, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        s = (x * x).sum(0)
        sums[name] = s if sums[name] is None else sums[name] + s

    device = next(model.parameters()).device
    with torch.no_grad(), forward_pre_hooks({n: hook_module(m) for n, m in layers.items()}, hook):
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i:i + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count["tokens"] += batch.numel()
    return {n: (s / count["tokens"]).cpu().numpy() for n, s in sums.items() if s is not None}


def allocate_bits(model, diagonals, base: QuantSpec, high: QuantSpec, budget: float):
    """Per-layer specs: `high` for the most sensitive layers, the others `base`, average
    stored bits per weight at most `budget`.

    Parameters
    ----------
    model : torch.nn.Module
        Its layers named in `diagonals` give the weights.
    diagonals : dict of str to (n,) ndarray
        From :func:`input_diagonals`.
    base, high : QuantSpec
        The two formats (same method); `high` must store more bits than `base`.
    budget : float
        Average bits per weight over the layers of `diagonals`, overhead counted.

    Returns
    -------
    layer_specs : dict of str to QuantSpec
        The layers moved to `high` (for ``quantize_model(..., layer_specs=...)``).
    report : dict
        ``bits_per_weight`` (the average reached), ``high_layers``, ``high_fraction``
        (of the weights), and per layer ``gain`` (relative loss saved per extra bit).

    Raises
    ------
    ParameterError
        If `base` alone exceeds the budget or `high` does not store more bits.
    """
    if base.method != high.method:
        raise ParameterError("high", f"`high` must be of `base`'s method {base.method!r}, got {high.method!r}")
    modules = dict(model.named_modules())
    items = []
    total_w = total_bits = 0.0
    for name, h in diagonals.items():
        W = linear_weight(modules[name]).detach().double().cpu().numpy()
        m, n = W.shape
        b0, b1 = format_bits(base, n), format_bits(high, n)
        if b1 <= b0:
            raise ParameterError("high", f"`high` ({high.describe()}) must store more bits per weight than "
                                 f"`base` ({base.describe()}) on layer {name!r}: {b1:.3f} <= {b0:.3f}")
        gain = relative_grid_loss(W, h, base) - relative_grid_loss(W, h, high)
        cost = (b1 - b0) * m * n
        items.append((gain * m * n / cost, name, cost))  # loss weighted by the layer's size
        total_w += m * n
        total_bits += b0 * m * n
    if total_bits / total_w > budget + 1e-12:
        raise ParameterError("budget", f"`base` alone stores {total_bits / total_w:.4f} bits per weight, over the "
                             f"budget {budget}")
    chosen = {}
    high_w = 0.0
    for priority, name, cost in sorted(items, key=lambda t: -t[0]):
        if (total_bits + cost) / total_w <= budget + 1e-12:
            total_bits += cost
            chosen[name] = high
            high_w += cost
    report = {"bits_per_weight": total_bits / total_w, "high_layers": sorted(chosen),
              "gain": {name: p for p, name, _ in items}}
    report["high_fraction"] = float(sum(
        linear_weight(modules[n]).numel() for n in chosen) / total_w)
    logger.info("mixed precision: %d of %d layers at %s, %.4f bits per weight (budget %s)", len(chosen),
                len(items), high.describe(), report["bits_per_weight"], budget)
    return chosen, report

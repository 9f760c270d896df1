r"""Uniform integer grids: the shared part of the rtn, gptq, ojbkq and regcal methods.

The layer-wise problem, per output row :math:`w_j` (a row of ``W``, an RHS of the
BILS problem),

.. math::

    \min_{x_j \in [0, 2^b - 1]^n} (t_j - \hat w_j)^\top H (t_j - \hat w_j), \qquad
    \hat w_j = s_j \circ (x_j - z_j),

with ``H`` the damped input Gram and target :math:`t_j = w_j` (GPTQ) or the joint /
regularised target :math:`W_\alpha = W (H + \alpha D) H^{-1}` (OJBKQ, RegCal), is handed
to :class:`bils.BILSProblem.from_gram` with ``scale = S`` and ``offset = -S Z``
expanded per coordinate from the group grids, and solved by a :mod:`bils` solver.

This module holds what the four methods share: the spec (:class:`QuantSpec`), the layer
(:class:`QuantizedLayer`), the grid (:func:`compute_grid`), the driver
:func:`quantize_weight` (grid, then the method's ``solve``, then the diagnostics), and the
stored format (:data:`UNIFORM_FORMAT`). Each method's own step is one module next to
this one (:mod:`~llm_adapter.methods.rtn`, :mod:`~llm_adapter.methods.gptq`,
:mod:`~llm_adapter.methods.ojbkq`, :mod:`~llm_adapter.methods.regcal`); a new method on a
uniform grid is one more such module (see ``docs/architecture.md``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from bils import BILSProblem, GroupedGrid

from ..errors import ParameterError, QuantizedFormatError
from ..formats.packing import SUPPORTED_BITS, pack, packed_length, unpack
from ._shared import (as_float64, damped_hessian, is_device_array, is_int, is_real, namespace, to_host, upper_times,
                      with_fallback)
from .registry import LayerFormat, Method, get, names, register

__all__ = ["CLIPS", "D_SHRINKS", "ORDERINGS", "QuantSpec", "QuantizedLayer", "Solution", "UniformProblem",
           "UNIFORM_FORMAT", "check_layer", "compute_grid", "quantize_weight", "register_uniform",
           "uniform_methods"]

#: Grid search rules.
CLIPS = ("minmax", "mse")
#: Column orderings (:data:`bils.ordering.ORDERINGS`); ``"diag"`` is GPTQ's act-order.
ORDERINGS = ("natural", "diag", "sqrd", "vblast", "minpivot")

_REGCAL_ALPHAS = ("sample", "closed_form")
#: Shrinkage rules of ``D`` (:attr:`QuantSpec.d_shrink`).
D_SHRINKS = (None, "layer", "entry")

# GPTQ's MSE clip search (Quantizer(mse=True): grid=100, maxshrink=0.8, norm=2.4)
_MSE_GRID = 100
_MSE_MAXSHRINK = 0.8
_MSE_NORM = 2.4


def uniform_methods() -> tuple[str, ...]:
    """Registered methods whose spec is a :class:`QuantSpec` (the values of ``method``)."""
    return tuple(n for n in names() if get(n).spec_type is QuantSpec)


# --------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class QuantSpec:
    r"""How one linear layer ``W`` (out, in) is quantized to a uniform integer grid.

    Every field is validated in ``__post_init__``; errors name the field.

    Grid
    ----
    bits : int, 2..8
        Codes are in ``[0, 2**bits - 1]``.
    group_size : int
        ``-1``: one (scale, zero) per output row ("per-channel"). Otherwise a positive
        number of consecutive input columns sharing a grid; when it does not divide
        ``in_features`` the last group is shorter.
    sym : bool
        Symmetric grid: zero point fixed at ``2**(bits-1)`` (GPTQ's ``(maxq + 1) / 2``),
        scale from ``max(|min|, |max|)``.
    clip : {"minmax", "mse"}
        ``"minmax"``: the range of the weights (widened to include 0, as GPTQ). ``"mse"``:
        GPTQ's shrink search (range ``p * [min, max]`` for ``p = 1, 0.99, …, 0.21``,
        keeping the ``p`` of least ``sum |w - ŵ|^2.4`` per row/group).

    Grids are always *static*: computed from the original ``W`` per group, in original
    column order, before any column is quantized (GPTQ's ``static_groups=True``). So the
    grid does not depend on the ordering, and ``g_idx[i] = i // group_size``.

    Solver
    ------
    method : {"rtn", "gptq", "ojbkq", "regcal"}
        ``"rtn"``: round to nearest (ignores ``H``). ``"gptq"``: box Babai
        (:func:`bils.babai`) on ``H`` — exactly GPTQ's loop. ``"ojbkq"``: joint target
        :math:`W_\mu` + Klein paths + K-best, the least-cost point per output row.
        ``"regcal"``: regularised target :math:`W_\alpha` + successive rounding
        (Babai), optionally as a beam over the full alphabet.
    ordering : str
        Column ordering (one of :data:`ORDERINGS`); default ``"diag"`` = act-order.
    damp : float >= 0
        Damping: ``damp * mean(diag H)`` added to the diagonal (GPTQ's ``percdamp``).
    block_size : int >= 1
        Lazy-batch block of the nearest-plane sweep (results do not depend on it).

    OJBKQ
    -----
    mu : float in [0, 1] or "closed_form"
        Target mix :math:`\mu` (the α of :func:`bils.joint_target`): 0 = GPTQ's target,
        1 = GPTAQ's. Default 0.25, RegCal's fixed α (OJBKQ publishes no value).
        ``"closed_form"``: per layer, RegCal's closed form (:func:`bils.alpha_closed_form`)
        of a first Babai pass at ``alpha0``, capped at ``mu_max``, then the search at that µ.
    mu_max : float in [0, 1]
        Cap of the closed-form µ (default 1: no cap).
    lam : float >= 0
        Ridge: ``lam * mean(diag H)`` added to the diagonal on top of ``damp``.
    n_samples : int >= 0
        Klein paths per row (the Babai path is always a candidate too).
    tau : "auto" or float >= 0
        Klein temperature (see :func:`bils.klein`).
    beam_width : int >= 0 or None
        K-best survivors per row. ``None``: 4 for ojbkq, 1 for regcal. ``0`` or ``1``
        means no beam (ojbkq: Klein only; regcal: plain successive rounding = Babai).
        regcal's beam expands each survivor over the full alphabet (``2**bits``
        children), as the authors' script does with ``beam_width=6``.

    RegCal
    ------
    alpha : float in [0, 1], "sample" or "closed_form"
        Fixed α (default 0.25); ``"sample"``: one α per calibration sequence from
        Beta(``beta_m``, ``beta_m``) folded to ``min(α, 1-α)``, folded into ``D`` by the
        calibration (then ``quantize_weight`` uses ``W_1`` with that ``D``);
        ``"closed_form"``: quantize at ``alpha0``, take :func:`bils.alpha_closed_form`
        of the result, re-quantize at that α.
    alpha0 : float in [0, 1]
        First-pass α of ``"closed_form"``.
    beta_m : float > 0
        Beta parameter of ``"sample"``.

    Generalisation and refinement (any uniform method that uses them)
    ------------------------------------------------------------------
    d_shrink : None, "layer" or "entry"
        Shrink ``D`` toward 0 by its estimated noise (:mod:`llm_adapter.calibration.statistics`:
        the calibration sequences are split in two folds by parity, the noise variance of
        ``D`` is estimated from the fold difference). ``"layer"``: one factor
        :math:`\max(0, 1 - \sum v / \sum D^2)` per layer; ``"entry"``: per entry
        :math:`\max(0, 1 - v_{ik} / D_{ik}^2)`. ``None`` (default): ``D`` as accumulated.
    refine : bool
        After the codes are fixed, refit each group's scale and (integer) zero point by
        H-weighted least squares against the method's target
        (:func:`llm_adapter.methods.refine.refine_grid`); a row keeps its grid unless the
        objective decreases.

    Scale tuning (after the whole model is quantized; :func:`llm_adapter.calibration.quantize_model`)
    ------------------------------------------------------------------------------------------------
    tune_steps : int >= 0
        Adam steps of :func:`llm_adapter.calibration.tuning.tune_scales`: every group's scale
        (codes and zero points fixed) is tuned to match the float model's next-token
        distributions on the calibration windows (KL divergence, a held-out slice of the
        windows for early stopping), then rounded to float16. 0 (default): no tuning.
    tune_lr : float > 0
        Adam's learning rate, relative to each scale (default 1e-3).
    tune_norms : bool
        Also tune the model's RMSNorm weights (kept in the model only: the native format
        stores the quantized layers, so save the model's state to keep them).
    """

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: str = "minmax"
    method: str = "gptq"
    ordering: str = "diag"
    damp: float = 0.01
    block_size: int = 128
    # OJBKQ
    mu: float = 0.25
    lam: float = 0.0
    n_samples: int = 5
    tau: float | str = "auto"
    beam_width: int | None = None
    # RegCal
    alpha: float | str = 0.25
    alpha0: float = 0.25
    beta_m: float = 5.0
    mu_max: float = 1.0
    # generalisation / refinement
    d_shrink: str | None = None
    refine: bool = False
    # scale tuning (whole model, after quantization)
    tune_steps: int = 0
    tune_lr: float = 1e-3
    tune_norms: bool = False

    def __post_init__(self):
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ParameterError("bits", f"`bits` must be an int in [2, 8], got {self.bits!r}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 1):
            raise ParameterError("group_size", f"`group_size` must be -1 (per-channel) or a positive int, got {self.group_size!r}")
        if not isinstance(self.sym, bool):
            raise ParameterError("sym", f"`sym` must be a bool, got {self.sym!r}")
        if self.clip not in CLIPS:
            raise ParameterError("clip", f"`clip` must be one of {CLIPS}, got {self.clip!r}")
        if self.method not in uniform_methods():
            raise ParameterError("method", f"`method` must be one of {uniform_methods()}, got {self.method!r}")
        if self.ordering not in ORDERINGS:
            raise ParameterError("ordering", f"`ordering` must be one of {ORDERINGS}, got {self.ordering!r}")
        if not is_real(self.damp) or self.damp < 0:
            raise ParameterError("damp", f"`damp` must be a finite float >= 0, got {self.damp!r}")
        if not is_int(self.block_size) or self.block_size < 1:
            raise ParameterError("block_size", f"`block_size` must be a positive int, got {self.block_size!r}")
        names = ("alpha0", "mu_max") if self.mu == "closed_form" else ("mu", "alpha0", "mu_max")
        for name in names:
            v = getattr(self, name)
            if not is_real(v) or not 0 <= v <= 1:
                raise ParameterError(name, f"`{name}` must be a float in [0, 1], got {v!r}")
        if not is_real(self.lam) or self.lam < 0:
            raise ParameterError("lam", f"`lam` must be a finite float >= 0, got {self.lam!r}")
        if not is_int(self.n_samples) or self.n_samples < 0:
            raise ParameterError("n_samples", f"`n_samples` must be an int >= 0, got {self.n_samples!r}")
        if not (self.tau == "auto" or (is_real(self.tau) and self.tau >= 0)):
            raise ParameterError("tau", f"`tau` must be 'auto' or a float >= 0, got {self.tau!r}")
        if self.beam_width is not None and (not is_int(self.beam_width) or self.beam_width < 0):
            raise ParameterError("beam_width", f"`beam_width` must be None or an int >= 0, got {self.beam_width!r}")
        if isinstance(self.alpha, str):
            if self.alpha not in _REGCAL_ALPHAS:
                raise ParameterError("alpha", f"`alpha` must be a float in [0, 1], 'sample' or 'closed_form', got {self.alpha!r}")
        elif not is_real(self.alpha) or not 0 <= self.alpha <= 1:
            raise ParameterError("alpha", f"`alpha` must be a float in [0, 1], 'sample' or 'closed_form', got {self.alpha!r}")
        if not is_real(self.beta_m) or self.beta_m <= 0:
            raise ParameterError("beta_m", f"`beta_m` must be a finite float > 0, got {self.beta_m!r}")
        if self.d_shrink not in D_SHRINKS:
            raise ParameterError("d_shrink", f"`d_shrink` must be one of {D_SHRINKS}, got {self.d_shrink!r}")
        if not isinstance(self.refine, bool):
            raise ParameterError("refine", f"`refine` must be a bool, got {self.refine!r}")
        if not is_int(self.tune_steps) or self.tune_steps < 0:
            raise ParameterError("tune_steps", f"`tune_steps` must be an int >= 0, got {self.tune_steps!r}")
        if not is_real(self.tune_lr) or self.tune_lr <= 0:
            raise ParameterError("tune_lr", f"`tune_lr` must be a finite float > 0, got {self.tune_lr!r}")
        if not isinstance(self.tune_norms, bool):
            raise ParameterError("tune_norms", f"`tune_norms` must be a bool, got {self.tune_norms!r}")

    # ------------------------------------------------------------------ derived
    @property
    def maxq(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def joint(self) -> bool:
        """Whether the method uses ``D`` (full-precision inputs) at all."""
        if self.method == "ojbkq":
            return self.mu == "closed_form" or self.mu > 0
        if self.method == "regcal":
            return self.alpha != 0
        return False

    @property
    def alpha_beta(self) -> float | None:
        """Beta parameter of per-sequence α sampling (regcal ``alpha="sample"``), else None.

        The calibration draws one α per sequence from Beta(m, m), folded, into ``D``.
        """
        return self.beta_m if self.method == "regcal" and self.alpha == "sample" else None

    @property
    def total_damp(self) -> float:
        """Relative damping of ``H``: ``damp``, plus the ridge ``lam`` for ojbkq."""
        return self.damp + (self.lam if self.method == "ojbkq" else 0.0)

    @property
    def beam(self) -> int:
        """Effective beam width (``beam_width`` with the method's default)."""
        if self.beam_width is not None:
            return max(1, self.beam_width)
        return 4 if self.method == "ojbkq" else 1

    def n_groups(self, in_features: int) -> int:
        """Groups per row for a layer with ``in_features`` columns (last may be partial)."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return f"{self.bits}-bit, group size {self.group_size}, {'sym' if self.sym else 'asym'}"

    def to_dict(self) -> dict:
        """Plain ``dict`` of the fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)

# --------------------------------------------------------------------------- layer
@dataclass
class QuantizedLayer:
    """Codes and grid of one quantized linear layer ``W`` (out_features, in_features).

    Dequantization: ``W[j, i] = scales[j, g_idx[i]] * (codes[j, i] - zeros[j, g_idx[i]])``.

    Attributes
    ----------
    codes : (out, in) ndarray of uint8
        Integer codes in ``[0, 2**bits - 1]``, original column order.
    scales : (out, n_groups) ndarray of float32
        Positive step per output row and group.
    zeros : (out, n_groups) ndarray of float32
        Integer-valued zero points (code units).
    g_idx : (in,) ndarray of int32
        Group of each input column (``i // group_size`` for static groups).
    bits : int
        2, 3 or 4 (8 also accepted by the packers).
    group_size : int
        Columns per group, or -1 for one group per row (per-channel).
    perm : (in,) ndarray of int64 or None
        Decision order used by the solver (act-order), for information.
    bias : (out,) ndarray or None
        Bias of the original module, kept in float.
    stats : dict
        Per-layer diagnostics: ``loss``, ``rel_loss``, ``babai_bound``,
        ``clipped_frac``, ``time``, ``method``.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.uniform import QuantizedLayer
    >>> q = QuantizedLayer(codes=np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8),
    ...                    scales=np.array([[0.5], [0.25]], dtype=np.float32),
    ...                    zeros=np.array([[1.0], [2.0]], dtype=np.float32),
    ...                    g_idx=np.zeros(4, dtype=np.int32), bits=2, group_size=-1)
    >>> q.shape
    (2, 4)
    >>> q.dequantize().tolist()  # scales * (codes - zeros), row by row
    [[-0.5, 0.0, 0.5, 1.0], [0.25, 0.0, -0.25, -0.5]]
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    bits: int
    group_size: int
    perm: np.ndarray | None = None
    bias: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """Float weights ``(out, in)``."""
        s = self.scales[:, self.g_idx]
        z = self.zeros[:, self.g_idx]
        return (s * (self.codes.astype(np.float32) - z)).astype(dtype)

    # ----------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the layer (``perm`` and ``bias`` when present); see :meth:`metadata`."""
        arrays = {"codes": self.codes, "scales": self.scales, "zeros": self.zeros, "g_idx": self.g_idx}
        for name in ("perm", "bias"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return arrays

    def metadata(self) -> dict:
        """The scalars of the layer (JSON): ``bits``, ``group_size``, ``stats``."""
        return {"bits": self.bits, "group_size": self.group_size, "stats": self.stats}

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "QuantizedLayer":
        """Inverse of :meth:`to_arrays` + :meth:`metadata`."""
        return cls(codes=arrays["codes"], scales=arrays["scales"], zeros=arrays["zeros"], g_idx=arrays["g_idx"],
                   bits=meta["bits"], group_size=meta["group_size"], perm=arrays.get("perm"),
                   bias=arrays.get("bias"), stats=meta["stats"])


# --------------------------------------------------------------------------- grid
def _minmax_params(x, maxq, sym):
    """GPTQ's ``Quantizer.find_params`` on the last axis of ``x``: (scale, zero), zero integer."""
    xmin = np.minimum(x.min(axis=-1), 0.0)
    xmax = np.maximum(x.max(axis=-1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = np.where(both0, -1.0, xmin)
    xmax = np.where(both0, 1.0, xmax)
    return xmin, xmax


def _scale_zero(xmin, xmax, maxq, sym):
    scale = (xmax - xmin) / maxq
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.round(-xmin / scale)  # torch.round, as GPTQ (half to even)
    return scale, zero


def _group_params(x, maxq, sym, clip):
    """(scale, zero) over the last axis of ``x`` (..., g)."""
    xmin, xmax = _minmax_params(x, maxq, sym)
    scale, zero = _scale_zero(xmin, xmax, maxq, sym)
    if clip == "mse":
        best = np.full(scale.shape, np.inf)
        for i in range(int(_MSE_MAXSHRINK * _MSE_GRID)):
            p = 1 - i / _MSE_GRID
            s1, z1 = _scale_zero(p * xmin, p * xmax, maxq, sym)
            if sym:
                z1 = zero
            q = np.clip(np.round(x / s1[..., None]) + z1[..., None], 0, maxq)
            err = np.sum(np.abs(s1[..., None] * (q - z1[..., None]) - x) ** _MSE_NORM, axis=-1)
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s1, scale)
            zero = np.where(better, z1, zero)
    return scale, zero


def compute_grid(W, spec: QuantSpec):
    """Static grid of ``W`` (m, n): ``scales`` and ``zeros``, each (m, n_groups).

    Groups are consecutive columns in original order (``i // group_size``); a last
    partial group gets its own grid. Scales are returned as float32 (what is stored),
    zeros as integer-valued float32.

    Parameters
    ----------
    W : (m, n) array_like, torch.Tensor or CuPy array
        Float weights, rows are output channels. A CuPy array: the min-max rule reduces
        the groups on the device; the MSE search copies ``W`` to the host.
    spec : QuantSpec
        Its ``bits``, ``group_size``, ``sym`` and ``clip`` define the grid.

    Returns
    -------
    scales : (m, n_groups) ndarray of float32
        Positive step per row and group.
    zeros : (m, n_groups) ndarray of float32
        Integer-valued zero points in ``[0, 2**bits - 1]`` (code units).

    Examples
    --------
    >>> import numpy as np
    >>> s, z = compute_grid(np.array([[-1.0, 0.5, 2.0]]), QuantSpec(bits=2))
    >>> s.tolist(), z.tolist()
    ([[1.0]], [[1.0]])
    """
    W = as_float64("W", W, ndim=2)
    m, n = W.shape
    gs = n if spec.group_size == -1 else spec.group_size
    n_full = n // gs

    def on_host(x):
        """A group block (..., g) as the host grid search reads it. The min-max rule reads
        only each group's extremes, which are exact in any order: a device array is reduced
        there to (..., 2) [min, max] and only that comes to the host (same grid)."""
        if spec.clip == "minmax" and is_device_array(x):
            xp = namespace(x)
            return to_host(xp.stack([x.min(axis=-1), x.max(axis=-1)], axis=-1))
        return to_host(x)

    parts = []
    if n_full:
        parts.append(_group_params(on_host(W[:, : n_full * gs].reshape(m, n_full, gs)), spec.maxq, spec.sym,
                                   spec.clip))
    if n_full * gs < n:
        s, z = _group_params(on_host(W[:, n_full * gs:]), spec.maxq, spec.sym, spec.clip)
        parts.append((s[:, None], z[:, None]))
    scales = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    zeros = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
    return scales, zeros




# --------------------------------------------------------------------------- driver
@dataclass
class Solution:
    """What a uniform method's ``solve`` returns.

    Attributes
    ----------
    target : (m, n) ndarray
        The target the codes approximate (``W``, or the joint target :math:`W_\\alpha`).
    codes : (m, n) ndarray or None
        Codes, when the method computes them itself (rtn); else taken from ``result``.
    problem : bils.BILSProblem or None
        The problem solved (for the diagnostics).
    result : object or None
        A result with ``x`` (n, m), ``cost`` (m,) and ``backend``.
    stats : dict
        Method-specific statistics (``alpha``, ``clipped_frac`` for rtn, ...).
    """

    target: np.ndarray
    codes: np.ndarray | None = None
    problem: Any = None
    result: Any = None
    stats: dict = field(default_factory=dict)


@dataclass
class UniformProblem:
    """The inputs of a uniform method's ``solve(prob) -> Solution``, grid already fixed.

    ``W`` (m, n), ``H`` undamped and ``Hd`` damped (n, n; None for rtn without
    calibration), ``D`` (n, n) or None, per-coordinate ``S``, ``Z`` and ``O = -S Z`` (n, m).
    """

    W: np.ndarray
    H: np.ndarray | None
    Hd: np.ndarray | None
    D: np.ndarray | None
    S: np.ndarray
    Z: np.ndarray
    O: np.ndarray
    spec: QuantSpec
    backend: str
    rng: Any
    g_idx: np.ndarray | None = None  # group of each input column: the solvers get the grid grouped

    def grids(self):
        """``(scale, offset)`` for the solvers: :class:`bils.GroupedGrid` s (one value per
        (group, output channel) and ``g_idx``) on the host, never expanded to (n, m); the
        per-coordinate ``S``, ``O`` for device arrays."""
        if self.g_idx is None or type(self.S) is not np.ndarray:  # device arrays (CuPy) stay dense
            return self.S, self.O
        first = np.unique(self.g_idx, return_index=True)[1]  # a row of each group
        return (GroupedGrid(self.S[first], self.g_idx),
                GroupedGrid(self.O[first], self.g_idx))

    def problem_for(self, T) -> BILSProblem:
        """The BILS of target rows ``T`` (m, n) on this grid and ``H`` (damped by the spec)."""
        spec = self.spec
        scale, offset = self.grids()
        return BILSProblem.from_gram(self.H, T.T, 0, spec.maxq, scale=scale, offset=offset,
                                     damp=spec.total_damp, ordering=spec.ordering)

    def solve(self, solver, problem, **options):
        """``solver(problem, backend=..., **options)`` with the numpy fall-back for ``"auto"``."""
        return with_fallback(lambda be: solver(problem, backend=be, **options), self.backend,
                             f"bils.{solver.__name__}")[0]


def register_uniform(name: str, solve: Callable[[UniformProblem], Solution], *, needs_calibration=True,
                     description="", replace=False, device_arrays=False) -> Method:
    """Register a method on a uniform grid: ``solve(prob: UniformProblem) -> Solution``.

    Everything else (spec :class:`QuantSpec`, grid, layer :class:`QuantizedLayer`, stored
    format, :class:`~llm_adapter.nn.QuantLinear`) is shared. ``device_arrays=True``
    declares that `solve` works on CuPy arrays too (the :class:`UniformProblem`'s arrays
    are then CuPy arrays: use the array API numpy and CuPy share, and :mod:`bils`).
    """
    def quantize(W, H=None, D=None, spec=None, *, backend="auto", rng=None, bias=None):
        return _quantize_uniform(solve, W, H, D, spec, backend=backend, rng=rng, bias=bias)

    quantize.__name__ = f"quantize_{name}"
    quantize.__doc__ = f"Quantize ``W`` with method {name!r}: :func:`llm_adapter.methods.uniform.quantize_weight`."
    return register(Method(name=name, spec_type=QuantSpec, quantize=quantize, layer_type=QuantizedLayer,
                           format=UNIFORM_FORMAT, module="llm_adapter.nn.linear:QuantLinear",
                           needs_calibration=needs_calibration, description=description,
                           cli_options=cli_options, spec_from_cli=spec_from_cli,
                           device_arrays=device_arrays), replace=replace)


def cli_options(parser) -> None:
    """The ``quantize`` options of the uniform-grid methods (besides the shared ones)."""
    parser.add_argument("--sym", action="store_true", help="symmetric grid (zero point 2**(bits-1))")
    parser.add_argument("--clip", choices=CLIPS, default="minmax", help="grid search (default minmax)")
    parser.add_argument("--tune-steps", type=int, default=0, metavar="N",
                        help="after quantizing, tune every group's scale (codes fixed) for N Adam steps to match "
                             "the float model's next-token distributions on the calibration windows "
                             "(default 0: off)")
    parser.add_argument("--tune-lr", type=float, default=1e-3, help="scale tuning's learning rate, relative "
                                                                    "(default 1e-3)")
    parser.add_argument("--tune-norms", action="store_true",
                        help="tune the RMSNorm weights too (written by --export-gptq / "
                             "--export-compressed-tensors, which carry the model's float tensors; not by --out)")


def spec_from_cli(args) -> QuantSpec:
    """:class:`QuantSpec` from the parsed ``quantize`` arguments."""
    return QuantSpec(bits=args.bits, group_size=args.group_size, sym=args.sym, clip=args.clip,
                     method=args.method, damp=args.damp, tune_steps=getattr(args, "tune_steps", 0),
                     tune_lr=getattr(args, "tune_lr", 1e-3), tune_norms=getattr(args, "tune_norms", False))


def quantize_weight(W, H=None, D=None, spec: QuantSpec | None = None, *, backend="auto", rng=None,
                    bias=None) -> QuantizedLayer:
    r"""Quantize a weight matrix ``W`` (out, in) to ``spec``; pure, numpy in and out.

    Parameters
    ----------
    W : (m, n) array_like or torch.Tensor
        Float weights, rows are output channels.
    H : (n, n) array_like, optional
        Input Gram :math:`\tilde X \tilde X^\top` (any positive normalisation), undamped.
        Required by every method but ``"rtn"`` (which only uses it for the loss).
    D : (n, n) array_like, optional
        Cross term :math:`(X - \tilde X)\tilde X^\top`, same normalisation as ``H``; for
        ``regcal`` with ``alpha="sample"`` it must already carry the per-sequence α
        (:class:`bils.JointStats`). ``None`` means the methods fall back to ``α = 0``.
    spec : QuantSpec, optional
        Default ``QuantSpec()`` (gptq, 4 bits, per-channel). ``spec.method`` picks the
        registered method's ``solve``.
    backend : {"auto", "numpy", "numba", "cupy"}
        For the :mod:`bils` solvers; ``"auto"`` falls back to numpy (with one warning)
        when a compiled kernel is unavailable.
    rng : None, int or numpy.random.Generator
        Randomness of Klein sampling (``ojbkq`` only).
    bias : (m,) array_like, optional
        Stored as is in the result.

    Returns
    -------
    QuantizedLayer
        Codes in original column order, float32 ``scales`` and ``zeros`` (m, n_groups),
        ``g_idx``, ``perm`` (solve order; ``perm[-1]`` decided first), and ``stats``:

        ``loss``
            :math:`\sum_j (w_j - \hat w_j)^\top H_d (w_j - \hat w_j)`, ``H_d`` damped.
        ``rel_loss``
            ``loss`` / :math:`\sum_j w_j^\top H_d w_j`.
        ``objective``
            The same with the method's target (:math:`W_\alpha`) in place of ``W``.
        ``babai_bound``
            :math:`\tfrac14 \sum_{ij} (R_{ii} S_{ij})^2`, Babai's worst case without clipping.
        ``clipped_frac``
            Fraction of coordinates whose nearest-plane centre lay more than ½ outside
            the box (from :math:`c - x = E / (R_{ii} S)`, :math:`E = Y - R(S\circ x + O)`).
        ``alpha``, ``time``, ``method``, ``backend``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 16)); X = rng.standard_normal((16, 64))
    >>> q = quantize_weight(W, X @ X.T, spec=QuantSpec(bits=3, method="gptq"), backend="numpy")
    >>> q.codes.shape, int(q.codes.max()) <= 7, q.stats["rel_loss"] < 0.1
    ((8, 16), True, True)
    """
    spec = QuantSpec() if spec is None else spec
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"`spec` must be a QuantSpec, got {type(spec).__name__}")
    return get(spec.method).quantize(W, H, D, spec, backend=backend, rng=rng, bias=bias)


def _quantize_uniform(solve, W, H, D, spec, *, backend, rng, bias) -> QuantizedLayer:
    # W, H, D may be CuPy arrays (the device path of quantize_model): then the damped H,
    # the per-coordinate grid, the problem, the solve and the diagnostics stay on the
    # device; the grid search (on W) and the codes come to the host.
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"`spec` must be a QuantSpec, got {type(spec).__name__}")
    t0 = time.perf_counter()
    W = as_float64("W", W, ndim=2)
    m, n = W.shape
    H = as_float64("H", H, ndim=2)
    D = as_float64("D", D, ndim=2)
    for name, a in (("H", H), ("D", D)):
        if a is not None and a.shape != (n, n):
            raise ValueError(f"`{name}` must be ({n}, {n}) to match `W` {W.shape}, got {a.shape}")
    if H is None and get(spec.method).needs_calibration:
        raise ValueError(f"`H` is required for method {spec.method!r}")
    if bias is not None:
        bias = as_float64("bias", to_host(bias), ndim=1).astype(np.float32)
    xp = namespace(W, H, D)
    if xp is not np:  # all on the device
        W, H, D = (None if a is None else xp.asarray(a) for a in (W, H, D))

    dead = None if H is None else xp.diag(H) == 0
    Wg = W if dead is None or not bool(dead.any()) or spec.group_size == -1 else xp.where(dead, 0.0, W)
    t_grid = time.perf_counter()
    scales, zeros = compute_grid(Wg, spec)  # GPTQ: static groups after zeroing dead columns
    t_grid = time.perf_counter() - t_grid
    gs = n if spec.group_size == -1 else spec.group_size
    g_idx = (np.arange(n) // gs).astype(np.int32)
    if xp is np:
        S = scales.astype(np.float64)[:, g_idx].T  # (n, m)
        Z = zeros.astype(np.float64)[:, g_idx].T
    else:
        gi = xp.asarray(g_idx)
        S = xp.ascontiguousarray(xp.asarray(scales, dtype=np.float64)[:, gi].T)
        Z = xp.ascontiguousarray(xp.asarray(zeros, dtype=np.float64)[:, gi].T)
    Hd = None if H is None else damped_hessian(H, spec.total_damp)[0]
    prob = UniformProblem(W=W, H=H, Hd=Hd, D=D, S=S, Z=Z, O=-S * Z, spec=spec, backend=backend, rng=rng,
                          g_idx=g_idx)
    sol = solve(prob)
    stats = {"method": spec.method, "alpha": None, "backend": None, **sol.stats}
    perm = None
    from_factor = None  # (objective, sum (W H_d) * W) from the factor, when it gives them
    if sol.result is not None:
        res, problem = sol.result, sol.problem
        codes = res.x.T
        stats["backend"] = res.backend
        # diagnostics in solve order
        p = problem.perm if problem.perm is not None else xp.arange(n)
        perm = to_host(p).astype(np.int64)
        xs = xp.asarray(res.x)[p].astype(np.float64)
        Rd = xp.diag(problem.R)[:, None] * S[p]  # (n, m): R_ii S_ij
        E = problem.Y - upper_times(problem.R, S[p] * xs + prob.O[p])  # R triangular: trmm on the host
        c = xs + E / Rd
        stats["clipped_frac"] = float(xp.mean((c < -0.5) | (c > spec.maxq + 0.5)))
        stats["babai_bound"] = float(0.25 * xp.sum(Rd * Rd))
        if not bool(dead.any()) and not bool(xp.any(xp.asarray(problem.cost_offset) != 0)):
            # E = R (T - Q)_p with R^T R = H_d (the damped H, columns in solve order) and
            # Y = R T_p: the objective is ||E||^2 and, for the target W, sum (W H_d) * W
            # is ||Y||^2 -- two (m, n) x (n, n) products less (dead columns change Y: not then)
            from_factor = (float(xp.sum(E * E)), float(xp.sum(problem.Y * problem.Y)))
        del xs, E, c, Rd
    else:
        codes = sol.codes

    codes_dev = xp.asarray(codes).astype(np.uint8)
    codes = to_host(codes_dev)
    if spec.refine and Hd is not None:
        from .refine import refine_grid

        scales, zeros, better = refine_grid(to_host(sol.target), to_host(Hd), codes, scales, zeros, g_idx,
                                            spec.maxq, sym=spec.sym)
        stats["refined_rows"] = float(np.mean(better))
        if np.any(better):
            from_factor = None  # the factor's E is of the grid before the refit
        S = xp.asarray(scales.astype(np.float64)[:, g_idx].T)
        Z = xp.asarray(zeros.astype(np.float64)[:, g_idx].T)
    if Hd is not None:
        Q = S.T * (codes_dev - Z.T)
        if from_factor is not None and sol.target is W:  # gptq
            stats["loss"], ref = from_factor
        else:
            E = W - Q
            stats["loss"] = float(xp.sum((E @ Hd) * E))
            ref = float(xp.sum((W @ Hd) * W))
        stats["rel_loss"] = stats["loss"] / ref if ref > 0 else 0.0
        if sol.target is W:  # gptq, rtn: the objective is the loss
            stats["objective"] = stats["loss"]
        elif from_factor is not None:
            stats["objective"] = from_factor[0]
        else:
            Et = sol.target - Q
            stats["objective"] = float(xp.sum((Et @ Hd) * Et))
    stats.setdefault("babai_bound", None)
    stats = {k: (float(v) if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v) for k, v in stats.items()}
    stats["time"] = time.perf_counter() - t0
    stats["time_grid"] = t_grid  # of which the grid search (the calibration's stage profile)
    return QuantizedLayer(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=spec.bits,
                          group_size=spec.group_size, perm=perm, bias=bias, stats=stats)


# --------------------------------------------------------------------------- stored format
def check_layer(name: str, layer: QuantizedLayer, where: str = "") -> None:
    """Raise :class:`~llm_adapter.errors.QuantizedFormatError` naming `name` and the field if
    `layer` is inconsistent: shapes, dtypes, codes in ``[0, 2**bits - 1]``, ``g_idx`` a valid
    group map (``ceil(in / group_size)`` groups of ``group_size`` columns, the last one
    possibly smaller, in any order), scales positive and finite, zero points integers in
    ``[0, 2**bits - 1]``, a finite bias, ``perm`` a permutation. Called on save and on load."""
    def bad(msg: str):
        raise QuantizedFormatError(f"{where}layer {name!r}: {msg}")

    if not isinstance(layer, QuantizedLayer):
        bad(f"must be a QuantizedLayer, got {type(layer).__name__}")
    if layer.bits not in SUPPORTED_BITS:
        bad(f"`bits` must be one of {SUPPORTED_BITS}, got {layer.bits!r}")
    codes = np.asarray(layer.codes)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        bad(f"`codes` must be a 2-D integer array, got {codes.dtype} with shape {codes.shape}")
    out_f, in_f = codes.shape
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << layer.bits):
        bad(f"`codes` must lie in [0, {(1 << layer.bits) - 1}] for bits={layer.bits}")
    gs = layer.group_size
    if not isinstance(gs, (int, np.integer)) or (gs != -1 and gs < 1):
        bad(f"`group_size` must be -1 (per-channel) or a positive int, got {gs!r}")
    g_idx = np.asarray(layer.g_idx)
    if g_idx.shape != (in_f,) or g_idx.dtype.kind not in "iu":
        bad(f"`g_idx` must be an integer array of shape ({in_f},), got {g_idx.dtype} {g_idx.shape}")
    scales, zeros = np.asarray(layer.scales), np.asarray(layer.zeros)
    if scales.ndim != 2 or scales.shape[0] != out_f:
        bad(f"`scales` must have shape ({out_f}, n_groups), got {scales.shape}")
    n_groups = scales.shape[1]
    if zeros.shape != scales.shape:
        bad(f"`zeros` must have the shape of `scales` {scales.shape}, got {zeros.shape}")
    if in_f and (g_idx.min() < 0 or g_idx.max() >= n_groups):
        bad(f"`g_idx` must lie in [0, {n_groups - 1}] (n_groups = scales.shape[1])")
    if in_f:
        gsz = in_f if gs == -1 else int(gs)
        want_groups = -(-in_f // gsz)
        if n_groups != want_groups:
            bad(f"`scales` must have {want_groups} group column(s) for in_features {in_f} and "
                f"group_size {gs}, got {n_groups}")
        counts = np.bincount(g_idx.astype(np.int64), minlength=n_groups)
        want = np.full(n_groups, gsz)
        want[-1] = in_f - gsz * (n_groups - 1)
        if not np.array_equal(counts, want):
            bad(f"`g_idx` is not a valid group map: each group must hold {gsz} columns (the last "
                f"{int(want[-1])}), got counts {counts[:8].tolist()}{'...' if n_groups > 8 else ''}")
    if not np.all(np.isfinite(scales)) or (scales.size and not np.all(scales > 0)):
        bad("`scales` must be positive and finite")
    maxq = (1 << layer.bits) - 1
    if zeros.size and (not np.all(np.isfinite(zeros)) or np.any(zeros != np.rint(zeros))
                       or zeros.min() < 0 or zeros.max() > maxq):
        bad(f"`zeros` must be integers in [0, {maxq}] (bits={layer.bits})")
    if layer.bias is not None and not np.all(np.isfinite(np.asarray(layer.bias, dtype=np.float64))):
        bad("`bias` has non-finite entries")
    if layer.perm is not None:
        perm = np.asarray(layer.perm)
        if perm.shape == (in_f,) and (perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(in_f))):
            bad(f"`perm` must be a permutation of range({in_f})")
    if layer.bias is not None and np.asarray(layer.bias).shape != (out_f,):
        bad(f"`bias` must have shape ({out_f},), got {np.asarray(layer.bias).shape}")
    if layer.perm is not None and np.asarray(layer.perm).shape != (in_f,):
        bad(f"`perm` must have shape ({in_f},), got {np.asarray(layer.perm).shape}")


#: Storage dtypes of the scales in the native format.
SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _write(name: str, layer: QuantizedLayer, tensors: dict, *, scale_dtype: str = "float32") -> dict:
    """Add layer `name`'s tensors (``qcodes``, ``scales``, ...) to `tensors`; return its metadata."""
    from ..formats._io import jsonable

    check_layer(name, layer)
    out_f, in_f = layer.shape
    tensors[f"{name}.qcodes"] = pack(layer.codes, layer.bits, axis=1)
    tensors[f"{name}.scales"] = np.ascontiguousarray(layer.scales, dtype=SCALE_DTYPES[scale_dtype])
    tensors[f"{name}.zeros"] = np.ascontiguousarray(layer.zeros, dtype=np.float32)
    tensors[f"{name}.g_idx"] = np.ascontiguousarray(layer.g_idx, dtype=np.int32)
    if layer.bias is not None:
        tensors[f"{name}.bias"] = np.ascontiguousarray(layer.bias)
    if layer.perm is not None:
        tensors[f"{name}.perm"] = np.ascontiguousarray(layer.perm, dtype=np.int64)
    return {
        "bits": int(layer.bits),
        "group_size": int(layer.group_size),
        "out_features": int(out_f),
        "in_features": int(in_f),
        "n_groups": int(layer.scales.shape[1]),
        "bias": layer.bias is not None,
        "perm": layer.perm is not None,
        "stats": jsonable(layer.stats),
    }


def _read(name: str, m: dict, get) -> QuantizedLayer:
    """Rebuild layer `name` from its metadata `m` and ``get(name, field, required=True)``."""
    from ..formats.native import CONFIG_NAME, TENSORS_NAME

    try:
        bits, gs = int(m["bits"]), int(m["group_size"])
        out_f, in_f, n_groups = int(m["out_features"]), int(m["in_features"]), int(m["n_groups"])
    except (KeyError, TypeError, ValueError) as err:
        raise QuantizedFormatError(
            f"{CONFIG_NAME}: layer {name!r} metadata is missing or has a bad field: {err}"
        ) from err
    if bits not in SUPPORTED_BITS:
        raise QuantizedFormatError(f"{CONFIG_NAME}: layer {name!r} `bits` must be one of {SUPPORTED_BITS}, got {bits}")
    qcodes = get(name, "qcodes")
    want = (out_f, packed_length(in_f, bits))
    if qcodes.dtype != np.int32 or qcodes.shape != want:
        raise QuantizedFormatError(
            f"{TENSORS_NAME}: layer {name!r} `qcodes` must be int32 {want}, got "
            f"{qcodes.dtype} {qcodes.shape}"
        )
    scales = get(name, "scales")
    zeros = get(name, "zeros")
    for fname, arr in (("scales", scales), ("zeros", zeros)):
        if arr.shape != (out_f, n_groups) or arr.dtype.kind != "f":
            raise QuantizedFormatError(
                f"{TENSORS_NAME}: layer {name!r} `{fname}` must be float ({out_f}, {n_groups}), "
                f"got {arr.dtype} {arr.shape}"
            )
    g_idx = get(name, "g_idx")
    if g_idx.shape != (in_f,) or g_idx.dtype.kind not in "iu":
        raise QuantizedFormatError(
            f"{TENSORS_NAME}: layer {name!r} `g_idx` must be integer ({in_f},), got {g_idx.dtype} {g_idx.shape}"
        )
    layer = QuantizedLayer(
        codes=unpack(qcodes, bits, in_f, axis=1),
        scales=scales.astype(np.float32),
        zeros=zeros.astype(np.float32),
        g_idx=g_idx.astype(np.int32),
        bits=bits,
        group_size=gs,
        perm=get(name, "perm", required=bool(m.get("perm"))),
        bias=get(name, "bias", required=bool(m.get("bias"))),
        stats=dict(m.get("stats") or {}),
    )
    if layer.group_size != gs or layer.shape != (out_f, in_f):
        raise QuantizedFormatError(f"{TENSORS_NAME}: layer {name!r} does not match its metadata")
    check_layer(name, layer, where=f"{TENSORS_NAME}: ")
    return layer


#: The uniform layers' tensors in the native format (kind ``"uniform"``, format version 1).
UNIFORM_FORMAT = LayerFormat(kind="uniform", write=_write, read=_read, format_version=1)


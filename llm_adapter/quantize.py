r"""Quantize one linear layer: a pure function of ``(W, H, D, spec)``.

The layer-wise problem, per output row :math:`w_j` (a row of ``W``, an RHS of the
BILS problem),

.. math::

    \min_{x_j \in [0, 2^b - 1]^n} (t_j - \hat w_j)^\top H (t_j - \hat w_j), \qquad
    \hat w_j = s_j \circ (x_j - z_j),

with ``H`` the damped input Gram and target :math:`t_j = w_j` (GPTQ) or the joint /
regularised target :math:`W_\alpha = W (H + \alpha D) H^{-1}` (OJBKQ, RegCal), is handed
to :class:`bils.BILSProblem.from_gram` with ``scale = S`` and ``offset = -S Z``
expanded per coordinate from the group grids, and solved by a :mod:`bils` solver.
"""

from __future__ import annotations

import logging
import time

import numpy as np

import bils
from bils import BILSProblem, alpha_closed_form, joint_target

from .quantized import QuantizedLayer
from .spec import QuantSpec

__all__ = ["quantize_weight", "compute_grid", "damped_hessian"]

logger = logging.getLogger(__name__)

# GPTQ's MSE clip search (Quantizer(mse=True): grid=100, maxshrink=0.8, norm=2.4)
_MSE_GRID = 100
_MSE_MAXSHRINK = 0.8
_MSE_NORM = 2.4

_warned_fallback: set = set()


def _to_numpy(name, a, ndim=2):
    if a is None:
        return None
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, without importing torch
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{name}` must be finite")
    return a


def _round(x):
    """The tie rule of :mod:`bils`: ``floor(x + 0.5)``."""
    return np.floor(x + 0.5)


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
    W : (m, n) array_like or torch.Tensor
        Float weights, rows are output channels.
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
    W = _to_numpy("W", W)
    m, n = W.shape
    gs = n if spec.group_size == -1 else spec.group_size
    n_full = n // gs
    parts = []
    if n_full:
        parts.append(_group_params(W[:, : n_full * gs].reshape(m, n_full, gs), spec.maxq, spec.sym, spec.clip))
    if n_full * gs < n:
        s, z = _group_params(W[:, n_full * gs:], spec.maxq, spec.sym, spec.clip)
        parts.append((s[:, None], z[:, None]))
    scales = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    zeros = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
    return scales, zeros


def damped_hessian(H, damp):
    """``H`` as :meth:`bils.BILSProblem.from_gram` sees it: dead columns get ``H_ii = 1``,
    then ``damp * mean(diag H)`` is added to the diagonal. Returns (H_damped, dead).

    Parameters
    ----------
    H : (n, n) array_like
        Input Gram, undamped (not modified).
    damp : float >= 0
        Relative damping (GPTQ's ``percdamp``); ``0`` only repairs dead columns.

    Returns
    -------
    H_damped : (n, n) ndarray of float64
        A damped copy of ``H``.
    dead : (n,) ndarray of bool
        Columns whose diagonal was 0 (inputs never seen in calibration).

    Examples
    --------
    >>> import numpy as np
    >>> Hd, dead = damped_hessian(np.diag([2.0, 0.0, 1.0]), 0.75)
    >>> np.diag(Hd).tolist(), dead.tolist()  # [2, 1, 1] + 0.75 * mean([2, 1, 1])
    ([3.0, 2.0, 2.0], [False, True, False])
    """
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    if damp:
        H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    return H, dead


def _solve(solver, problem, backend, **options):
    """Call a :mod:`bils` solver; with ``backend="auto"`` fall back to numpy when the
    compiled kernel is missing."""
    try:
        return solver(problem, backend=backend, **options)
    except (NotImplementedError, ImportError) as err:
        if backend != "auto":
            raise
        name = solver.__name__
        if name not in _warned_fallback:
            _warned_fallback.add(name)
            logger.warning("bils.%s: no compiled kernel (%s); using backend='numpy'", name, err)
        return solver(problem, backend="numpy", **options)


def quantize_weight(W, H=None, D=None, spec: QuantSpec = QuantSpec(), *, backend="auto", rng=None,
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
    spec : QuantSpec
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
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"`spec` must be a QuantSpec, got {type(spec).__name__}")
    t0 = time.perf_counter()
    W = _to_numpy("W", W)
    m, n = W.shape
    H = _to_numpy("H", H)
    D = _to_numpy("D", D)
    for name, a in (("H", H), ("D", D)):
        if a is not None and a.shape != (n, n):
            raise ValueError(f"`{name}` must be ({n}, {n}) to match `W` {W.shape}, got {a.shape}")
    if H is None and spec.method != "rtn":
        raise ValueError(f"`H` is required for method {spec.method!r}")
    if bias is not None:
        bias = _to_numpy("bias", bias, ndim=1).astype(np.float32)

    dead = None if H is None else np.diag(H) == 0
    Wg = W if dead is None or not dead.any() or spec.group_size == -1 else np.where(dead, 0.0, W)
    scales, zeros = compute_grid(Wg, spec)  # GPTQ: static groups after zeroing dead columns
    gs = n if spec.group_size == -1 else spec.group_size
    g_idx = (np.arange(n) // gs).astype(np.int32)
    S = scales.astype(np.float64)[:, g_idx].T  # (n, m)
    Z = zeros.astype(np.float64)[:, g_idx].T
    O = -S * Z
    stats = {"method": spec.method, "alpha": None, "backend": None}

    damp = spec.damp + (spec.lam if spec.method == "ojbkq" else 0.0)
    Hd = None if H is None else damped_hessian(H, damp)[0]
    perm = None
    if spec.method == "rtn":
        codes = np.clip(_round(W / S.T + Z.T), 0, spec.maxq)
        c = W / S.T + Z.T
        stats["clipped_frac"] = float(np.mean((c < -0.5) | (c > spec.maxq + 0.5)))
        target = W
        problem = None
    else:
        # the solvers take the grid grouped: one value per (group, output channel) and g_idx
        grid_s = bils.GroupedGrid(scales.T, g_idx)
        grid_o = bils.GroupedGrid(-(scales.astype(np.float64) * zeros.astype(np.float64)).T, g_idx)

        def problem_for(T):
            return BILSProblem.from_gram(H, T.T, 0, spec.maxq, scale=grid_s, offset=grid_o,
                                         damp=damp, ordering=spec.ordering)

        use_d = D is not None
        if spec.method == "gptq":
            target = W
            problem = problem_for(target)
            res = _solve(bils.babai, problem, backend, block_size=spec.block_size)
        elif spec.method == "ojbkq":
            mu = spec.mu if use_d else 0.0
            target = joint_target(W, Hd, D, mu) if mu else W
            stats["alpha"] = mu
            problem = problem_for(target)
            res = _solve(bils.klein, problem, backend, n_samples=spec.n_samples, tau=spec.tau,
                         rng=rng, block_size=spec.block_size)
            if spec.beam > 1:
                kb = _solve(bils.kbest, problem, backend, beam_width=spec.beam)
                better = kb.cost < res.cost
                x = np.where(better[None, :], kb.x, res.x)
                stats["kbest_wins"] = float(np.mean(better))
                res = _Picked(x, np.where(better, kb.cost, res.cost), res.backend)
        else:  # regcal
            if not use_d:
                alpha = 0.0
            elif spec.alpha == "sample":
                alpha = 1.0  # α already folded into D per calibration sequence
            elif spec.alpha == "closed_form":
                alpha = spec.alpha0
            else:
                alpha = float(spec.alpha)
            target, problem, res = _regcal(W, Hd, D, alpha, spec, problem_for, backend)
            if use_d and spec.alpha == "closed_form":
                Q = S.T * (res.x.T - Z.T)
                alpha = alpha_closed_form(Q, W, Hd, D)
                target, problem, res = _regcal(W, Hd, D, alpha, spec, problem_for, backend)
            stats["alpha"] = alpha if spec.alpha != "sample" or not use_d else "sample"
        codes = res.x.T
        stats["backend"] = res.backend
        # diagnostics in solve order
        p = problem.perm if problem.perm is not None else np.arange(n)
        perm = p.astype(np.int64)
        xs = res.x[p].astype(np.float64)
        Rd = np.diag(problem.R)[:, None] * S[p]  # (n, m): R_ii S_ij
        E = problem.Y - problem.R @ (S[p] * xs + O[p])
        c = xs + E / Rd
        stats["clipped_frac"] = float(np.mean((c < -0.5) | (c > spec.maxq + 0.5)))
        stats["babai_bound"] = float(0.25 * np.sum(Rd * Rd))

    codes = codes.astype(np.uint8)
    Q = S.T * (codes - Z.T)
    if Hd is not None:
        E = W - Q
        stats["loss"] = float(np.sum((E @ Hd) * E))
        ref = float(np.sum((W @ Hd) * W))
        stats["rel_loss"] = stats["loss"] / ref if ref > 0 else 0.0
        Et = target - Q
        stats["objective"] = float(np.sum((Et @ Hd) * Et))
    stats.setdefault("babai_bound", None)
    stats["time"] = time.perf_counter() - t0
    return QuantizedLayer(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=spec.bits,
                          group_size=spec.group_size, perm=perm, bias=bias, stats=stats)


class _Picked:
    """Per-row minimum of two solver results (x, cost, backend)."""

    def __init__(self, x, cost, backend):
        self.x, self.cost, self.backend = x, cost, backend


def _regcal(W, Hd, D, alpha, spec, problem_for, backend):
    target = joint_target(W, Hd, D, alpha) if alpha else W
    problem = problem_for(target)
    if spec.beam > 1:
        res = _solve(bils.kbest, problem, backend, beam_width=spec.beam, n_children=1 << spec.bits)
    else:
        res = _solve(bils.babai, problem, backend, block_size=spec.block_size)
    return target, problem, res

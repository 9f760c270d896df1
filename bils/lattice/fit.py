r"""Fitting a lattice generator to data under a metric: :func:`fit_generator`, :class:`LatticeFit`."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import scipy.linalg

from .._validate import _real_array, choice_iv, float_iv, int_iv
from .codebook import Codebook, check_vectors, metric_factor
from .compander import check_mu, compand
from .encode import ENCODE_METHODS, encode_prepared

__all__ = ["LatticeFit", "fit_generator"]

#: Step of the MSE-optimal uniform quantizer with ``2**b`` levels for a unit Gaussian
#: (Max 1960; Hui & Neuhoff 2001), b = 1..8: the initial scale of :func:`fit_generator`.
_GAUSS_STEP = (1.596, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308)

#: Multipliers of the initial step tried by :func:`fit_generator` (the best one is kept).
_INIT_SCALES = (0.6, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 1.8)

#: Trial steps per iteration of :func:`fit_generator`: the full step, then halvings.
_MAX_STEPS = 7


@dataclass(frozen=True)
class LatticeFit:
    """Result of :func:`fit_generator`.

    Attributes
    ----------
    codebook : Codebook
        The fitted codebook.
    x : (n, N) ndarray of int64
        Codes of ``V`` under the fitted codebook (= ``encode(codebook, V, metric,
        method=encode_method).x``).
    cost : (N,) ndarray
        Metric distance per column for those codes.
    history : (n_accepted + 1,) ndarray
        The reported loss of the initial codebook and after each accepted step;
        strictly decreasing.
    info : mapping
        ``n_iter`` (iterations run), ``n_rejected`` (backtracking halvings rejected),
        ``init_scale`` (the chosen multiple of the Gaussian step), ``stopped``
        (``"n_iter"`` or ``"no_decrease"``).

    Examples
    --------
    >>> import numpy as np, bils
    >>> rng = np.random.default_rng(0)
    >>> V = rng.standard_normal((4, 200))  # 200 vectors, two 2-D sub-vectors each
    >>> fit = bils.fit_generator(V, 2, d=2, n_iter=3, backend="numpy")
    >>> fit.codebook, fit.x.shape, fit.cost.shape
    (Codebook(d=2, bits=2), (4, 200), (200,))
    >>> len(fit.history), bool(fit.loss == fit.history[-1]), fit.info["stopped"]
    (4, True, 'n_iter')
    >>> bool(np.array_equal(bils.lattice.encode(fit.codebook, V, backend="numpy").x, fit.x))
    True
    """

    codebook: Codebook
    x: np.ndarray
    cost: np.ndarray
    history: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @property
    def loss(self) -> float:
        """Final reported loss (``history[-1]``)."""
        return float(self.history[-1])


def _ls_generator(V, Zo, M, wts, G0, lam):
    r"""Minimise :math:`\sum_j w_j\lVert C(v_j - (I\otimes G)\hat z_j)\rVert^2 / \sum w
    + \lambda \lVert G - G_0\rVert_F^2` over :math:`G` (normal equations, d² unknowns)."""
    n, N = V.shape
    d = G0.shape[0]
    m = n // d
    Zw = Zo * (wts / wts.sum())[None, :]
    # vec(C_s G z_s) = (z_sᵀ ⊗ C_s) vec(G) (column-major vec), so the normal matrix is
    # Σ_{s,t} kron(Zw_s Zo_tᵀ, M_st): entry [(a, i), (b, j)] = Σ_st P[s,a,t,b] M[s,i,t,j]
    P = (Zw @ Zo.T).reshape(m, d, m, d).transpose(0, 2, 1, 3).reshape(m * m, d * d)
    M4 = M.reshape(m, d, m, d).transpose(0, 2, 1, 3).reshape(m * m, d * d)
    A = (P.T @ M4).reshape(d, d, d, d).transpose(0, 2, 1, 3).reshape(d * d, d * d)
    K = ((M @ V) @ Zw.T).reshape(m, d, m, d)
    rhs = np.einsum("sisa->ia", K)  # Σ_s (M V)_s Zw_sᵀ
    A[np.diag_indices_from(A)] += lam
    b = rhs.reshape(-1, order="F") + lam * G0.reshape(-1, order="F")
    g = scipy.linalg.solve(A, b, assume_a="sym")
    return g.reshape(d, d, order="F")


def _clip_sv(G, bounds):
    U, s, Vt = np.linalg.svd(G)
    return (U * np.clip(s, bounds[0], bounds[1])) @ Vt


def fit_generator(V, bits, *, d, metric=None, weights=None, n_iter=10, penalty=1e-3,
                  sv_bounds=(0.25, 4.0), encode_method="nearest_plane", offset=0.5, mu=None,
                  G0=None, beam_width=8, max_nodes=None, backend="auto"):
    r"""Fit a generator to vectors: alternate encoding and a least-squares step on G.

    Minimises the (weighted) mean metric distance plus a penalty toward the initial
    generator,

    .. math::

        L(G, Z) = \frac{\sum_j w_j\, (v_j - \hat v_j)^T M (v_j - \hat v_j)}{\sum_j w_j}
        + \lambda\,\frac{\mathrm{tr} M}{n}\,\lVert G - G_0\rVert_F^2,
        \qquad \hat v_j = (I_m \otimes G)(z_j + o),

    by block coordinate descent: encode (fix :math:`G`, :func:`encode` with
    ``encode_method``), then the exact least-squares minimiser over :math:`G` for fixed
    codes (normal equations in :math:`d^2` unknowns), singular values clipped to
    ``sv_bounds``. The step is accepted only if, after re-encoding, the loss decreases;
    otherwise it is halved (up to 3 times) and the fit stops when no halving helps. So
    the reported ``history`` is strictly decreasing.

    Initialisation (GLVQ): :math:`G_0 = \alpha\,\Delta_b\,L` where
    :math:`L L^T` is the covariance of the sub-vectors, :math:`\Delta_b` the MSE-optimal
    uniform step of a unit Gaussian with :math:`2^b` levels, and :math:`\alpha` the best
    of a few multiples (0.6–1.5) under the loss.

    Parameters
    ----------
    V : (n, N) array_like
        Training vectors, ``n`` a multiple of ``d`` (``m = n / d`` sub-vectors each).
    bits : int
        Codes per dimension :math:`2^b` (default box, see :func:`default_box`).
    d : int
        Sub-vector (lattice) dimension.
    metric : (n, n) array_like, optional
        SPD metric shared by all columns (default identity).
    weights : (N,) array_like, optional
        Non-negative column weights :math:`w_j` (default 1).
    n_iter : int, default 10
        Maximum number of encode/update iterations.
    penalty : float >= 0, default 1e-3
        :math:`\lambda`, relative to the mean diagonal of the metric.
    sv_bounds : (float, float) or None, default (0.25, 4.0)
        Singular values of :math:`G` are kept in
        ``[sv_bounds[0] * min σ(G0), sv_bounds[1] * max σ(G0)]``.
    encode_method : str, default "nearest_plane"
        One of :data:`ENCODE_METHODS`.
    offset : float or (d,) array_like, default 0.5
        Code offset of the codebook.
    mu : float, optional
        µ-law compander strength; ``amax`` is the largest magnitude of ``V``. Fitting
        then happens in the companded domain (the loss is measured there).
    G0 : (d, d) array_like, optional
        Initial generator instead of the Cholesky initialisation (no scale search).
    beam_width, max_nodes, backend
        Passed to :func:`encode`.

    Returns
    -------
    LatticeFit

    Examples
    --------
    >>> import numpy as np, bils
    >>> rng = np.random.default_rng(0)
    >>> V = np.linalg.cholesky([[1.0, 0.8], [0.8, 1.0]]) @ rng.standard_normal((2, 500))
    >>> fit = bils.fit_generator(V, 2, d=2, n_iter=5, backend="numpy")
    >>> bool(np.all(np.diff(fit.history) < 0)), fit.codebook
    (True, Codebook(d=2, bits=2))
    >>> bool(np.allclose(bils.lattice.decode(fit.codebook, fit.x).shape, V.shape))
    True
    """
    d = int_iv("d", d, minimum=1)
    bits = int_iv("bits", bits, minimum=1)
    V, _ = check_vectors("V", V, d)
    n, N = V.shape
    C = metric_factor(metric, n)
    M = C.T @ C
    if weights is None:
        wts = np.ones(N)
    else:
        wts = _real_array("weights", weights).astype(np.float64)
        if wts.shape != (N,) or not np.all(np.isfinite(wts)) or np.any(wts < 0) or wts.sum() <= 0:
            raise ValueError(f"`weights` must be finite, >= 0, not all 0, with shape ({N},)")
    n_iter = int_iv("n_iter", n_iter, minimum=0)
    penalty = float_iv("penalty", penalty)
    if penalty < 0:
        raise ValueError(f"`penalty` must be >= 0, got {penalty}")
    if sv_bounds is not None:
        if (not isinstance(sv_bounds, (tuple, list)) or len(sv_bounds) != 2
                or not all(isinstance(b, numbers.Real) and np.isfinite(b) for b in sv_bounds)
                or not 0 < sv_bounds[0] <= 1 <= sv_bounds[1]):
            raise ValueError("`sv_bounds` must be None or (lo, hi) with 0 < lo <= 1 <= hi")
    encode_method = choice_iv("encode_method", encode_method, ENCODE_METHODS)
    beam_width = int_iv("beam_width", beam_width, minimum=1)
    max_nodes = int_iv("max_nodes", max_nodes, minimum=1, allow_none=True)
    amax = None
    if mu is not None:
        amax = float(np.max(np.abs(V)))
        if amax == 0:
            raise ValueError("`V` must not be all zeros when companding (`mu` given)")
        mu, amax = check_mu(mu, amax)
        V = compand(V, mu, amax)
    lam = penalty * np.trace(M) / n
    wsum = wts.sum()

    def evaluate(G):
        cb = Codebook(G, bits, offset=offset, mu=mu, amax=amax)
        res = encode_prepared(cb, V, C, encode_method, beam_width, max_nodes, backend)
        loss = float(wts @ res.cost) / wsum + lam * float(np.sum((G - G0) ** 2))
        return cb, res, loss

    if G0 is None:
        Sub = V.reshape(n // d, d, N).transpose(1, 0, 2).reshape(d, -1)
        cov = Sub @ Sub.T / Sub.shape[1]
        cov[np.diag_indices(d)] += 1e-8 * max(np.trace(cov) / d, 1e-300) + 1e-300
        L = np.linalg.cholesky(cov)
        step = _GAUSS_STEP[bits - 1] if bits <= len(_GAUSS_STEP) else 4.0 * 2.0 ** -bits
        best = None
        for a in _INIT_SCALES:
            G0 = a * step * L
            cand = evaluate(G0)
            if best is None or cand[2] < best[1][2]:
                best = (a, cand)
        init_scale, (cb, res, loss) = best
        G0 = cb.G
    else:
        G0 = _real_array("G0", G0).astype(np.float64)
        if G0.shape != (d, d):
            raise ValueError(f"`G0` must have shape ({d}, {d}), got {G0.shape}")
        init_scale = None
        cb, res, loss = evaluate(G0)
    s0 = np.linalg.svd(G0, compute_uv=False)
    if sv_bounds is None:  # still keep G safely invertible
        bounds = (1e-6 * s0[0], np.inf)
    else:
        bounds = (sv_bounds[0] * s0[-1], sv_bounds[1] * s0[0])
    history = [loss]
    rejected = 0
    stopped = "n_iter"
    it = 0
    for it in range(1, n_iter + 1):
        Zo = res.x + np.tile(cb.offset, n // d)[:, None]
        target = _clip_sv(_ls_generator(V, Zo, M, wts, G0, lam), bounds)
        G = cb.G
        for _ in range(_MAX_STEPS):  # full step, then halvings
            cand = evaluate(target)
            if cand[2] < loss:
                break
            rejected += 1
            target = _clip_sv(0.5 * (G + target), bounds)
        else:
            stopped = "no_decrease"
            break
        cb, res, loss = cand
        history.append(loss)
    return LatticeFit(cb, res.x, res.cost, np.asarray(history),
                      {"n_iter": it, "n_rejected": rejected, "init_scale": init_scale,
                       "stopped": stopped})

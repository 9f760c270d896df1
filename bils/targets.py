r"""Objective-joint and regularised calibration targets (OJBKQ, RegCal/CoreQ).

For a linear layer with weights ``W`` (m, n) — rows are output channels, i.e. RHS —
full-precision inputs ``X`` (n, N) and inputs ``X̃`` from the already-quantized model:

.. math::

    f_\alpha(Q) = (1-\alpha)\lVert (Q - W)\tilde X\rVert_F^2
                  + \alpha \lVert Q\tilde X - W X\rVert_F^2
                = \lVert (Q - W_\alpha)\tilde X\rVert_F^2 + \text{const},

    W_\alpha = W (H + \alpha D) H^{-1}, \qquad H = \tilde X\tilde X^\top,
    \qquad D = \Delta X\,\tilde X^\top,\; \Delta X = X - \tilde X.

``alpha = 0`` is GPTQ ("symmetric"), ``alpha = 1`` GPTAQ ("asymmetric"). Any solver on
``H`` with targets ``W_alpha`` minimises :math:`f_\alpha`. The module sees only matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ._guard import is_symmetric
from ._validate import _real_array, float_iv, int_iv

__all__ = ["joint_target", "alpha_closed_form", "JointStats", "fold_beta"]


def _square(name, a, n=None):
    a = _real_array(name, a).astype(np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"`{name}` must be a square 2-D array, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"`{name}` must be ({n}, {n}) to match `W`, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{name}` must be finite")
    return a


def _wh_iv(W, H, D):
    W = _real_array("W", W).astype(np.float64)
    if W.ndim != 2:
        raise ValueError(f"`W` must be 2-D (m, n), got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError("`W` must be finite")
    n = W.shape[1]
    H = _square("H", H, n)
    if not is_symmetric(H):  # only one triangle is read by the Cholesky solve
        raise ValueError("`H` must be symmetric")
    return W, H, _square("D", D, n)


def _finite_out(name, value, what):
    """Refuse a non-finite derived value (overflow of finite inputs)."""
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{what} overflowed to a non-finite value: rescale `{name}`")
    return value


def _cho(H):
    try:
        return scipy.linalg.cho_factor(H, lower=False)
    except np.linalg.LinAlgError:
        raise ValueError("`H` must be positive definite (damp it first)") from None


def joint_target(W, H, D, alpha):
    r"""Shifted target :math:`W_\alpha = W + \alpha\, W D H^{-1}`.

    Parameters
    ----------
    W : (m, n) array_like
        Float weights (rows = output channels).
    H : (n, n) array_like
        Symmetric positive-definite Gram of the quantized-model inputs (damped).
    D : (n, n) array_like
        Cross term :math:`(X - \tilde X)\tilde X^\top` (already multiplied by per-sequence
        α when accumulated with :class:`JointStats` and ``alpha="sample"``; then pass
        ``alpha=1``).
    alpha : float in [0, 1]

    Returns
    -------
    (m, n) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> from bils.targets import joint_target
    >>> W = np.array([[1.0, 2.0]]); H = np.eye(2); D = np.array([[0.0, 0.0], [1.0, 0.0]])
    >>> joint_target(W, H, D, 0.5).tolist()
    [[2.0, 2.0]]

    Device inputs (CuPy arrays) are computed on the device and give a CuPy array
    (Cholesky of ``H`` and two triangular solves there).
    """
    from ._backend import array_namespace

    xp = array_namespace(W, H, D)
    if xp is not np:
        return _joint_target_xp(xp, W, H, D, alpha)
    W, H, D = _wh_iv(W, H, D)
    alpha = float_iv("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
    if alpha == 0:
        return W.copy()
    # W D H^{-1} = (H^{-1} D^T W^T)^T since H is symmetric
    with np.errstate(over="ignore", invalid="ignore"):
        WD = _finite_out("W` or `D", W @ D, "the product W D")
        out = W + alpha * scipy.linalg.cho_solve(_cho(H), WD.T).T
    return _finite_out("W`, `H` or `D", out, "the joint target W + alpha W D H^-1")


def _joint_target_xp(xp, W, H, D, alpha):
    """:func:`joint_target` in the array namespace `xp` (CuPy): ``W + α (H⁻¹ (W D)ᵀ)ᵀ`` with
    ``H = L Lᵀ`` and two triangular solves. Tested with ``xp = numpy``."""
    W, H, D = (xp.asarray(a).astype(np.float64, copy=False) for a in (W, H, D))
    if W.ndim != 2:
        raise ValueError(f"`W` must be 2-D (m, n), got shape {W.shape}")
    n = W.shape[1]
    for name, a in (("H", H), ("D", D)):
        if a.shape != (n, n):
            raise ValueError(f"`{name}` must be ({n}, {n}) to match `W` {W.shape}, got {a.shape}")
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"`{name}` must be finite")
    if not bool(xp.all(xp.isfinite(W))):
        raise ValueError("`W` must be finite")
    alpha = float_iv("alpha", alpha)
    if alpha == 0:
        return W.copy()
    try:
        L = xp.linalg.cholesky(H)  # CuPy returns NaNs where numpy raises
    except np.linalg.LinAlgError:
        L = xp.full((1, 1), np.nan)
    if not bool(xp.all(xp.isfinite(xp.diag(L)))):
        raise ValueError("`H` must be positive definite (damp it first)")
    if xp is np:
        solve = scipy.linalg.solve_triangular
    else:
        from cupyx.scipy.linalg import solve_triangular as solve
    Z = solve(L, (W @ D).T, lower=True)
    return W + alpha * solve(L.T, Z, lower=False).T


def alpha_closed_form(Q, W, H, D):
    r"""RegCal's optimal α after rounding, clamped to [0, 1].

    .. math::

        \alpha^* = \frac{\langle Q - W,\; W D\rangle}{\operatorname{tr}(W D H^{-1} (W D)^\top)}

    (the minimiser over α of :math:`\lVert (Q - W_\alpha)\tilde X\rVert^2`).

    Parameters
    ----------
    Q : (m, n) array_like
        The rounded (dequantized) weights, same shape as ``W``.
    W : (m, n) array_like
        Float weights (rows = output channels).
    H : (n, n) array_like
        Symmetric positive-definite Gram of the quantized-model inputs (damped).
    D : (n, n) array_like
        Cross term :math:`(X - \tilde X)\tilde X^\top`, as for :func:`joint_target`.

    Returns
    -------
    float
        :math:`\alpha^*` clipped to ``[0, 1]``; ``0.0`` when the denominator is not
        positive (e.g. ``D = 0``).

    Examples
    --------
    >>> import numpy as np
    >>> from bils.targets import alpha_closed_form
    >>> W = np.array([[1.0, 2.0]]); H = np.eye(2); D = np.array([[0.0, 0.0], [1.0, 0.0]])
    >>> alpha_closed_form(np.array([[1.5, 2.0]]), W, H, D)
    0.25
    """
    W, H, D = _wh_iv(W, H, D)
    Q = _real_array("Q", Q).astype(np.float64)
    if Q.shape != W.shape:
        raise ValueError(f"`Q` must have the shape of `W` {W.shape}, got {Q.shape}")
    if not np.all(np.isfinite(Q)):
        raise ValueError("`Q` must be finite")
    with np.errstate(over="ignore", invalid="ignore"):
        WD = _finite_out("W` or `D", W @ D, "the product W D")
        den = float(np.sum(WD * scipy.linalg.cho_solve(_cho(H), WD.T).T))
        num = float(np.sum((Q - W) * WD))
    _finite_out("W`, `H`, `D` or `Q", np.array([num, den]), "alpha's numerator or denominator")
    if den <= 0:
        return 0.0
    return float(np.clip(num / den, 0.0, 1.0))


def fold_beta(rng, m, size=None):
    r"""Draw α from Beta(m, m) and fold it to :math:`\min(\alpha, 1-\alpha)` (in [0, 1/2])."""
    a = np.random.default_rng(rng).beta(m, m, size=size)
    return np.minimum(a, 1.0 - a)


class JointStats:
    r"""Accumulate :math:`H = \sum \tilde X \tilde X^\top` and :math:`D = \sum \alpha_s \Delta X \tilde X^\top`.

    Parameters
    ----------
    n : int
        Input features.
    alpha : None, float or "sample"
        ``None``: accumulate ``D`` unweighted (choose α later in :func:`joint_target`);
        a float: weight every sequence by it; ``"sample"``: draw one α per calibration
        sequence from :func:`fold_beta` (``beta_m``) and fold it into ``D`` (then use
        ``joint_target(W, H, D, 1.0)``).
    beta_m : float, default 5
    rng : None, int or Generator

    Examples
    --------
    >>> import numpy as np
    >>> from bils.targets import JointStats
    >>> st = JointStats(3)
    >>> Xq = np.ones((3, 4)); X = Xq + 0.1
    >>> st.add(X, Xq)
    >>> float(st.H[0, 0]), round(float(st.D[0, 0]), 6), st.n_samples
    (4.0, 0.4, 4)
    """

    def __init__(self, n, *, alpha=None, beta_m=5.0, rng=None, dtype=np.float64):
        self.n = int_iv("n", n, minimum=1)
        if not (alpha is None or alpha == "sample"):
            alpha = float_iv("alpha", alpha)
        self.alpha = alpha
        self.beta_m = float_iv("beta_m", beta_m, positive=True)
        self._rng = np.random.default_rng(rng)
        self.H = np.zeros((n, n), dtype=dtype)
        self.D = np.zeros((n, n), dtype=dtype)
        self.n_samples = 0
        self.alphas = []

    def add(self, X, Xq):
        """Add one calibration sequence: ``X`` (n, N) float inputs, ``Xq`` (n, N) quantized-model inputs."""
        X = np.asarray(X, dtype=self.H.dtype)
        Xq = np.asarray(Xq, dtype=self.H.dtype)
        if X.shape != Xq.shape or X.ndim != 2 or X.shape[0] != self.n:
            raise ValueError(f"`X` and `Xq` must both be ({self.n}, N), got {X.shape} and {Xq.shape}")
        for name, v in (("X", X), ("Xq", Xq)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"`{name}` must be finite (no NaN or inf)")
        a = 1.0
        if self.alpha == "sample":
            a = float(fold_beta(self._rng, self.beta_m))
        elif self.alpha is not None:
            a = self.alpha
        with np.errstate(over="ignore", invalid="ignore"):
            H = self.H + Xq @ Xq.T
            D = self.D + a * ((X - Xq) @ Xq.T)
        if not (np.all(np.isfinite(H)) and np.all(np.isfinite(D))):  # nothing is added
            raise ValueError("`X` and `Xq` overflow the accumulated statistics: rescale them")
        self.H, self.D = H, D
        self.alphas.append(a)
        self.n_samples += X.shape[1]

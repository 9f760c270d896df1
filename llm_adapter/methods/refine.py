r"""Scale/zero refinement of a uniform grid once the integer codes are fixed.

For one output row :math:`j` with target :math:`t_j` (``W`` or the joint target
:math:`W_\alpha`), fixed codes :math:`q_j` and groups :math:`g(i)`, the dequantized row is
:math:`\hat w_{ji} = s_{j,g(i)}\,(q_{ji} - z_{j,g(i)}) = a_{j,g(i)}\,q_{ji} + b_{j,g(i)}`,
linear in :math:`\theta_j = (a_j, b_j)` (:math:`a = s`, :math:`b = -s z`). The layer
objective :math:`(t_j - \hat w_j)^\top H (t_j - \hat w_j)` is then a small weighted least
squares in :math:`2G` unknowns per row (``G`` groups):

.. math::

    (A_j^\top H A_j)\,\theta_j = A_j^\top H\, t_j, \qquad
    A_j = [\operatorname{diag}(q_j) M,\; M],\quad M_{ig} = [g(i) = g].

The zero point is stored as an integer, so the refinement runs in two steps: the joint
fit of :math:`(a, b)` gives :math:`z = \operatorname{round}(-b/a)` clipped to
``[0, 2**bits - 1]`` (kept when :math:`a \le 0`), then the scales alone are refitted with
those zeros (:math:`A_j = \operatorname{diag}(q_j - z_{j,g}) M`, ``G`` unknowns). A row
keeps its old grid unless the new one has a smaller objective, so the objective never
increases. A ridge of ``1e-9 * mean(diag H)`` towards the old values keeps groups whose
codes are all equal well posed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["refine_grid", "row_objective"]


def row_objective(T, Q, H):
    r"""Per-row :math:`(t_j - q_j)^\top H (t_j - q_j)`; ``T``, ``Q`` (m, n), ``H`` (n, n) -> (m,)."""
    E = np.asarray(T, dtype=np.float64) - np.asarray(Q, dtype=np.float64)
    return np.einsum("ij,ij->i", E @ H, E)


def _normal_equations(HT, H, C, M, offsets: bool):
    """Gram (m, k, k) and right-hand side (m, k) of the per-row LS with design
    ``[diag(C_j) M, M]`` (offsets) or ``diag(C_j) M``; ``HT = T @ H``."""
    m, n = C.shape
    G = M.shape[1]
    k = 2 * G if offsets else G
    gram = np.empty((m, k, k))
    rhs = np.empty((m, k))
    # a-a block: sum_{i in g, l in h} c_ji H_il c_jl
    for h in range(G):
        cols = M[:, h]
        HCh = H[:, cols] @ C[:, cols].T  # (n, m): H (c_j restricted to group h)
        gram[:, :G, h] = (C * HCh.T) @ M
    rhs[:, :G] = (C * HT) @ M
    if offsets:
        P = H @ M  # (n, G)
        ab = (C[:, :, None] * P[None, :, :]).transpose(0, 2, 1) @ M.astype(np.float64)  # (m, G(h), G(g))
        gram[:, G:, :G] = ab  # [b_h, a_g] = sum_{i in g} c_ji (H M)_{i h}
        gram[:, :G, G:] = ab.transpose(0, 2, 1)
        gram[:, G:, G:] = (M.T.astype(np.float64) @ P)[None]
        rhs[:, G:] = HT @ M
    return gram, rhs


def refine_grid(T, H, codes, scales, zeros, g_idx, maxq, *, sym=False):
    r"""Least-squares scales (and integer zeros) of a uniform grid for fixed codes.

    Parameters
    ----------
    T : (m, n) array_like
        Target rows (``W`` or the joint target).
    H : (n, n) array_like
        Damped input Gram (symmetric positive definite).
    codes : (m, n) array_like of int
        Fixed integer codes in ``[0, maxq]``.
    scales, zeros : (m, G) array_like
        The current grid (``zeros`` integer-valued).
    g_idx : (n,) array_like of int
        Group of each column.
    maxq : int
        Largest code, ``2**bits - 1``.
    sym : bool
        Symmetric grid: zeros are kept, only the scales are refitted.

    Returns
    -------
    scales : (m, G) ndarray of float32
        Positive.
    zeros : (m, G) ndarray of float32
        Integer-valued in ``[0, maxq]``.
    improved : (m,) ndarray of bool
        Rows whose grid changed (objective strictly smaller).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((4, 8)); X = rng.standard_normal((8, 32)); H = X @ X.T
    >>> s = np.full((4, 1), 0.5); z = np.full((4, 1), 4.0); g = np.zeros(8, dtype=int)
    >>> q = np.clip(np.round(W / s) + z, 0, 7)
    >>> s2, z2, better = refine_grid(W, H, q, s, z, g, 7)
    >>> before = row_objective(W, s * (q - z), H); after = row_objective(W, s2 * (q - z2), H)
    >>> bool(np.all(after <= before + 1e-12))
    True
    """
    T = np.asarray(T, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    q = np.asarray(codes, dtype=np.float64)
    s0 = np.asarray(scales, dtype=np.float64)
    z0 = np.asarray(zeros, dtype=np.float64)
    g_idx = np.asarray(g_idx)
    m, n = T.shape
    G = s0.shape[1]
    if q.shape != (m, n) or H.shape != (n, n) or s0.shape != (m, G) or z0.shape != (m, G) or g_idx.shape != (n,):
        raise ValueError(f"shapes do not match: T {T.shape}, H {H.shape}, codes {q.shape}, scales {s0.shape}, "
                         f"zeros {z0.shape}, g_idx {g_idx.shape}")
    M = np.zeros((n, G), dtype=bool)
    M[np.arange(n), g_idx] = True
    HT = T @ H
    ridge = 1e-9 * float(np.mean(np.diag(H))) * max(1.0, float(np.max(np.abs(q))) ** 2)
    z = z0
    if not sym:
        gram, rhs = _normal_equations(HT, H, q, M, offsets=True)
        theta0 = np.concatenate([s0, -s0 * z0], axis=1)
        eye = np.eye(2 * G)
        theta = np.linalg.solve(gram + ridge * eye, (rhs + ridge * theta0)[..., None])[..., 0]
        a, b = theta[:, :G], theta[:, G:]
        ok = a > 0
        z = np.where(ok, np.clip(np.round(-b / np.where(ok, a, 1.0)), 0, maxq), z0)
    C = q - z[:, g_idx]
    gram, rhs = _normal_equations(HT, H, C, M, offsets=False)
    s = np.linalg.solve(gram + ridge * np.eye(G), (rhs + ridge * s0)[..., None])[..., 0]
    s = np.where(s > 0, s, s0)
    s32 = s.astype(np.float32)
    before = row_objective(T, s0[:, g_idx] * (q - z0[:, g_idx]), H)
    after = row_objective(T, s32.astype(np.float64)[:, g_idx] * C, H)
    better = after < before
    out_s = np.where(better[:, None], s32, s0.astype(np.float32))
    out_z = np.where(better[:, None], z, z0).astype(np.float32)
    return out_s, out_z, better

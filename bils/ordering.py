r"""Column orderings for nearest-plane solvers.

Every sequential solver decides coordinates from the last position to the first
("nearest-plane order"). An ordering is a permutation ``perm`` of the columns:
solve position ``p`` holds original coordinate ``perm[p]``, so ``perm[-1]`` is decided
first. Orderings that depend on the basis only are computed from the Gram matrix
:math:`G = A^\top A = R^\top R` (or a Hessian ``H``) and are shared by every RHS:

========== ==================================================================== ==========
name       rule                                                                 cost
========== ==================================================================== ==========
natural    identity (the last coordinate is decided first)                      O(n)
reverse    coordinate 0 decided first: GPTQ without act-order                   O(n)
diag       largest :math:`G_{ii}` decided first (GPTQ "act-order")              O(n log n)
sqrd       front to back, smallest remaining column norm first (Wübben et al.)   O(n^3)
vblast     back to front, largest achievable :math:`r_{pp}` (V-BLAST)          O(n^3)
minpivot   back to front, smallest achievable :math:`r_{pp}` (adversarial       O(n^3)
           baseline: what nearest plane should not do)
========== ==================================================================== ==========

:func:`chang_han` depends on the RHS and the box (Chang & Han 2008) and returns one
permutation per RHS; it re-factors per RHS and is meant for small ``n``.

Notes
-----
Unimodular (LLL-type) reduction changes the box into a polytope and is deliberately not
offered. SQRD and V-BLAST can lower Babai's success probability on some problems
(Chang, Wen & Xie 2013); :mod:`benchmarks/solver_quality.py` measures them.
"""

from __future__ import annotations

import numpy as np

from ._guard import spd_iv
from ._validate import _real_array, choice_iv

__all__ = ["ORDERINGS", "column_order", "chang_han"]

ORDERINGS = ("natural", "reverse", "diag", "sqrd", "vblast", "minpivot")


def _gram_iv(G):
    G = _real_array("G", G).astype(np.float64, copy=False)  # rejects complex / object dtypes
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"`G` must be a square 2-D array, got shape {G.shape}")
    if not np.all(np.isfinite(G)):
        raise ValueError("`G` must be finite")
    spd_iv("G", G, "positive definite for this ordering")  # every ordering, as documented
    return G


def _greedy_pivot(M, pick_max):
    """Order of symmetric Gaussian elimination on ``M`` picking the min/max pivot each step."""
    M = np.array(M, dtype=np.float64, copy=True)
    n = M.shape[0]
    remaining = np.ones(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    for step in range(n):
        piv = np.where(remaining, np.diag(M), -np.inf if pick_max else np.inf)
        j = int(np.argmax(piv) if pick_max else np.argmin(piv))
        order[step] = j
        remaining[j] = False
        if M[j, j] <= 0:
            raise ValueError("`G` must be positive definite for this ordering")
        col = M[:, j].copy()
        col[~remaining] = 0.0
        M -= np.outer(col, col) / M[j, j]
    return order


#: The rules of :func:`column_order` that read only the diagonal of ``G``.
DIAGONAL_ORDERINGS = ("natural", "reverse", "diag")


def order_from_diagonal(d, method):
    """:func:`column_order` for the rules in :data:`DIAGONAL_ORDERINGS`, from ``diag(G)`` alone.

    Lets callers with a large ``G`` skip forming a modified copy of it.

    Examples
    --------
    >>> from bils.ordering import order_from_diagonal
    >>> order_from_diagonal([3.0, 1.0, 2.0], "diag")
    array([1, 2, 0])
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[0]
    if method == "natural":
        return np.arange(n, dtype=np.int64)
    if method == "reverse":
        return np.arange(n - 1, -1, -1, dtype=np.int64)
    if method == "diag":
        # GPTQ processes argsort(diag, descending) front to back; we decide from the back.
        return np.argsort(-d, kind="stable")[::-1].astype(np.int64)
    raise ValueError(f"`method` must be one of {DIAGONAL_ORDERINGS}, got {method!r}")


def column_order(G, method="natural"):
    """Permutation of the columns for nearest-plane solvers, from a Gram matrix.

    Parameters
    ----------
    G : (n, n) array_like
        Symmetric positive-definite Gram matrix (``A.T @ A``) or Hessian ``H``.
    method : {"natural", "reverse", "diag", "sqrd", "vblast", "minpivot"}
        Rule, see the module table.

    Returns
    -------
    perm : (n,) ndarray of int64
        ``perm[p]`` is the original coordinate placed at solve position ``p``; the
        solvers decide position ``n - 1`` first.

    Examples
    --------
    >>> import numpy as np
    >>> from bils.ordering import column_order
    >>> column_order(np.diag([3.0, 1.0, 2.0]), "diag")   # largest diagonal decided first
    array([1, 2, 0])
    """
    method = choice_iv("ordering", method, ORDERINGS)
    G = _gram_iv(G)
    n = G.shape[0]
    if method in DIAGONAL_ORDERINGS:
        return order_from_diagonal(np.diag(G), method)
    if method == "sqrd":
        return _greedy_pivot(G, pick_max=False)
    # back-to-front rules work on the inverse: r_pp^2 of column j placed last = 1 / inv(G)_jj
    Ginv = np.linalg.inv(G)
    Ginv = 0.5 * (Ginv + Ginv.T)
    order = _greedy_pivot(Ginv, pick_max=(method == "minpivot"))
    return order[::-1].copy()


def _second_nearest(c, lo, hi):
    """Second-nearest integer to ``c`` inside [lo, hi] (the nearest when the box has one point)."""
    first = np.clip(np.floor(c + 0.5), lo, hi)
    other = np.where(c >= first, first + 1, first - 1)
    alt = np.where(c >= first, first - 1, first + 1)
    ok = (other >= lo) & (other <= hi)
    second = np.where(ok, other, alt)
    second = np.where((second >= lo) & (second <= hi), second, first)
    return first, second


def chang_han(R, Y, lo, hi, scale=None, offset=None):
    r"""Per-RHS Chang–Han column ordering for box-constrained problems.

    Back to front, among the remaining columns choose the one whose box-Babai decision
    is most reliable: with :math:`c_j` the unconstrained least-squares value of
    coordinate ``j`` given the others and :math:`r_{jj}` the diagonal it would get when
    placed last, maximise :math:`|r_{jj} s_j|\,|c_j - \bar x_j|` where :math:`\bar x_j`
    is the second-nearest box integer to :math:`c_j`. The chosen coordinate is fixed at
    its box-rounded value and removed (Chang & Han 2008, Breen & Chang 2011).

    Parameters
    ----------
    R : (n, n) array_like
        Upper-triangular factor.
    Y : (n,) or (n, k) array_like
        Right-hand sides.
    lo, hi : array_like of int
        Box, broadcastable to ``Y``.
    scale, offset : array_like, optional
        Grid, broadcastable to ``Y`` (``scale`` is assumed constant per RHS for the
        geometry: only its column value enters :math:`r_{jj} s_j`).

    Returns
    -------
    perm : (n, k) ndarray of int64
        One permutation per RHS, same convention as :func:`column_order`.

    Notes
    -----
    Costs :math:`O(n^3)` per RHS: intended for small ``n`` (say ``n <= 64``).

    Examples
    --------
    >>> import numpy as np
    >>> from bils.ordering import chang_han
    >>> perm = chang_han(np.eye(3), np.array([0.5, 0.1, 0.9]), 0, 3)
    >>> sorted(perm[:, 0].tolist())
    [0, 1, 2]
    """
    from ._validate import problem_iv

    can = problem_iv(R, Y, lo, hi, scale, offset)
    n, k = can.Y.shape
    perms = np.empty((n, k), dtype=np.int64)
    A = can.R
    for j in range(k):
        s = np.asarray(can.scale.col(j), dtype=np.float64)
        o = np.asarray(can.offset.col(j), dtype=np.float64)
        B = A * s[None, :]  # effective basis R diag(s)
        y = can.Y[:, j] - A @ o
        lo_j, hi_j = can.lo[:, j].astype(np.float64), can.hi[:, j].astype(np.float64)
        remaining = list(range(n))
        for pos in range(n - 1, -1, -1):
            Bm = B[:, remaining]
            G = Bm.T @ Bm
            try:
                Ginv = np.linalg.inv(G)
            except np.linalg.LinAlgError:
                raise ValueError("`R` (times `scale`) is too ill-conditioned for the 'chang_han' "
                                 "ordering: its Gram matrix is numerically singular") from None
            cls = Ginv @ (Bm.T @ y)
            rjj = 1.0 / np.sqrt(np.maximum(np.diag(Ginv), 1e-300))
            first, second = _second_nearest(cls, lo_j[remaining], hi_j[remaining])
            score = rjj * np.abs(cls - second)
            t = int(np.argmax(score))
            col = remaining.pop(t)
            perms[pos, j] = col
            y = y - B[:, col] * first[t]
    return perms

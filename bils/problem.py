r"""Multi-RHS BILS problems built from a design matrix or a Gram/Hessian matrix.

.. math::

    \min_{X \in \mathbb{Z}^{n\times k},\; LO \le X \le HI}
    \; \lVert Y - R\,(S \circ X + O) \rVert_F^2

A :class:`BILSProblem` stores ``R`` and ``Y`` in *solve order* (after the column
ordering), the grid and box in solve order too, and the permutation that maps back.
Every solver accepts a problem in place of ``(R, Y, lo, hi)`` and returns ``x`` in the
caller's original coordinate order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

from . import _dask
from ._dask import is_dask_array
from ._grid import GroupedGrid
from ._validate import _real_array, choice_iv, float_iv, problem_iv
from .ordering import DIAGONAL_ORDERINGS, ORDERINGS, chang_han, column_order, order_from_diagonal

__all__ = ["BILSProblem"]

_ORDER_CHOICES = ORDERINGS + ("chang_han",)


def _grid_2d(name, a, n, k, default, squeeze):
    """Return ``a`` as a 2-D array of shape (n or 1, k or 1) in original order.

    Follows numpy broadcasting against ``Y`` (n, k): a 1-D array is per RHS, except
    when the caller passed a single 1-D ``y``, where it is per coordinate.
    """
    if a is None:
        return np.full((1, 1), default, dtype=np.float64)
    if isinstance(a, GroupedGrid):
        return a  # validated against (n, k) by problem_iv
    a = np.asarray(a)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        a = a.reshape(-1, 1) if squeeze else a.reshape(1, -1)
    if a.ndim == 2 and a.shape[0] in (1, n) and a.shape[1] in (1, k):
        return a
    raise ValueError(f"`{name}` of shape {a.shape} must be broadcastable to ({n}, {k})")


def _is_symmetric(H, tile=256):
    """``|H - Hᵀ| <= 1e-10 |Hᵀ| + 1e-12 max|H|`` elementwise, tile against mirrored tile.

    Each ``tile`` x ``tile`` block above the diagonal is compared with the transpose of its
    mirror below it, so both fit in cache (slabs of whole columns read ``H`` across its
    rows: 30 ms for n = 1536 against 3 ms in tiles) and no (n, n) temporary is made.
    """
    atol = 1e-12 * max(1.0, float(np.abs(H).max()))
    n = H.shape[0]
    for i0 in range(0, n, tile):
        for j0 in range(i0, n, tile):
            a = H[i0:i0 + tile, j0:j0 + tile]
            b = H[j0:j0 + tile, i0:i0 + tile].T
            if not np.all(np.abs(a - b) <= atol + 1e-10 * np.abs(b)):
                return False
    return True


def _upper_cholesky_inplace(A):
    """Upper Cholesky factor ``R`` (``A = Rᵀ R``) of the C-contiguous symmetric ``A``, in place.

    LAPACK sees ``A``'s memory as the Fortran array ``Aᵀ = A`` and writes its lower factor
    ``L`` there, which read back in C order is ``R = Lᵀ``: no copy. Returns None when
    ``A`` is not (numerically) positive definite.
    """
    if A.dtype != np.float64 or not A.flags.c_contiguous:
        A = np.ascontiguousarray(A, dtype=np.float64)
    L, info = scipy.linalg.lapack.dpotrf(A.T, lower=1, clean=1, overwrite_a=1)
    if info != 0 or not np.all(np.isfinite(np.diag(L))):
        return None
    R = L.T
    return R if R.flags.c_contiguous else np.ascontiguousarray(R)


def _triangular_times(R, B):
    """``R @ B`` for upper-triangular ``R`` (n, n) and C-contiguous ``B`` (n, k), via BLAS trmm.

    Half the flops of a dense product. ``B`` is overwritten (callers pass a fresh copy).
    Works on the transposes: ``(R B)ᵀ = Bᵀ Rᵀ`` with ``Bᵀ`` and ``Rᵀ`` Fortran-ordered
    views, so nothing is copied.
    """
    if R.dtype != np.float64 or B.dtype != np.float64 or not B.flags.c_contiguous \
            or not R.flags.c_contiguous:
        return R @ B
    trmm = scipy.linalg.blas.dtrmm
    out = trmm(1.0, R.T, B.T, side=1, lower=1, trans_a=0, overwrite_b=1)
    return out.T


def _host(a):
    """`a` as a numpy array (a CuPy array is copied to the host)."""
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def _rows(a, perm):
    if isinstance(a, GroupedGrid):
        return a.permuted(perm)
    return a[perm] if a.shape[0] > 1 else a


@dataclass(frozen=True, eq=False)
class BILSProblem:
    """A multi-RHS BILS problem in solve order (use the ``from_*`` constructors).

    Attributes
    ----------
    R : (n, n) ndarray
        Upper-triangular factor in solve order (original order when ``perm`` is per RHS).
    Y : (n, k) ndarray
        Right-hand sides, same order as ``R``.
    lo, hi : ndarray
        Box, shapes (n or 1, k or 1), same order as ``R``.
    scale, offset : ndarray or GroupedGrid
        Grid, shapes (n or 1, k or 1), same order as ``R``; a :class:`~bils.GroupedGrid`
        when one was given (its group map permuted into solve order, values unchanged).
    perm : (n,) or (n, k) ndarray of int64, or None
        Solve position -> original coordinate; 2-D for per-RHS orderings (Chang–Han).
    cost_offset : (k,) ndarray
        Constant added to every cost (the part of ``B`` outside ``range(A)``).
    dead : (n,) ndarray of bool or None
        Coordinates whose Gram diagonal was zero (original order), see :meth:`from_gram`.
    squeeze : bool
        The caller gave a single 1-D right-hand side.
    """

    R: np.ndarray
    Y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    perm: np.ndarray | None
    cost_offset: np.ndarray
    dead: np.ndarray | None = None
    squeeze: bool = False

    def __post_init__(self):
        _problem_fields_iv(self)

    @property
    def n(self) -> int:
        return self.R.shape[0]

    @property
    def k(self) -> int:
        return self.Y.shape[1]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_triangular(cls, R, Y, lo, hi, *, scale=None, offset=None, ordering="natural"):
        """Problem from an upper-triangular factor ``R`` and right-hand sides ``Y``.

        A non-natural ``ordering`` re-factors ``R[:, perm] = Q R'`` and uses ``Q.T @ Y``.

        Examples
        --------
        >>> import numpy as np, bils
        >>> p = bils.BILSProblem.from_triangular(np.eye(2), [0.4, 2.6], 0, 3)
        >>> bils.babai(p).x.tolist()
        [0, 3]
        """
        if is_dask_array(Y):  # lazy right-hand sides: R in memory, Y stays a dask array
            choice_iv("ordering", ordering, _ORDER_CHOICES)
            return _dask.problem_from_triangular(cls, R, Y, lo, hi, scale, offset, ordering)
        can = problem_iv(R, Y, lo, hi, scale, offset)
        return cls._build(can.R, can.Y, lo, hi, scale, offset, can.squeeze, ordering,
                          np.zeros(can.k), gram=None, dead=None)

    @classmethod
    def from_design(cls, A, B, lo, hi, *, scale=None, offset=None, ordering="natural"):
        r"""Problem ``min ||B - A (S∘X + O)||²`` from a tall design matrix.

        Computes ``A[:, perm] = Q R`` (thin QR), ``Y = Q.T @ B`` and keeps
        ``||B||² - ||Q.T B||²`` per column as ``cost_offset`` so reported costs are the
        true residuals.

        Parameters
        ----------
        A : (m, n) array_like
            Design matrix with full column rank, ``m >= n``.
        B : (m,) or (m, k) array_like
            Observations, one column per RHS.
        lo, hi : array_like of int
            Box, broadcastable to (n, k), original coordinate order.
        scale, offset : array_like or GroupedGrid, optional
            Grid, broadcastable to (n, k), or a :class:`~bils.GroupedGrid` (one value per
            group of coordinates and RHS; never expanded to (n, k)). Original order.
        ordering : str
            One of :data:`bils.ordering.ORDERINGS` or ``"chang_han"``.

        Examples
        --------
        >>> import numpy as np, bils
        >>> A = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
        >>> p = bils.BILSProblem.from_design(A, A @ [1, 2], 0, 3)
        >>> bils.babai(p).x.tolist()
        [1, 2]
        """
        A = _real_array("A", A).astype(np.float64)
        if A.ndim != 2 or A.shape[0] < A.shape[1] or A.shape[1] == 0:
            raise ValueError(f"`A` must be a 2-D (m, n) array with m >= n >= 1, got shape {A.shape}")
        if not np.all(np.isfinite(A)):
            raise ValueError("`A` must be finite")
        if is_dask_array(B):  # lazy observations: Y = Qᵀ B and the cost offset per chunk
            choice_iv("ordering", ordering, _ORDER_CHOICES)
            return _dask.problem_from_design(cls, A, B, lo, hi, scale, offset, ordering)
        B = _real_array("B", B).astype(np.float64)
        if B.ndim not in (1, 2) or B.shape[0] != A.shape[0]:
            raise ValueError(f"`B` must have `A.shape[0]` = {A.shape[0]} rows, got shape {B.shape}")
        if not np.all(np.isfinite(B)):
            raise ValueError("`B` must be finite")
        squeeze = B.ndim == 1
        B2 = B.reshape(B.shape[0], -1)
        Q, R = np.linalg.qr(A)
        if np.any(np.abs(np.diag(R)) <= 1e-13 * max(1.0, np.abs(R).max())):
            raise ValueError("`A` must have full column rank")
        Y = Q.T @ B2
        cost_offset = np.maximum(np.sum(B2 * B2, axis=0) - np.sum(Y * Y, axis=0), 0.0)
        return cls._build(R, Y, lo, hi, scale, offset, squeeze, ordering, cost_offset,
                          gram=A.T @ A, dead=None)

    @classmethod
    def from_gram(cls, H, T, lo, hi, *, scale=None, offset=None, damp=0.0, ordering="natural"):
        r"""Problem ``min (T - Ŵ)ᵀ H (T - Ŵ)`` per column, ``Ŵ = S∘X + O``.

        This is the layer-wise quantization objective: ``H = X Xᵀ`` is the input Gram
        (Hessian) of a linear layer and ``T = Wᵀ`` its weights, one column per output
        channel. With ``H_p = H[perm][:, perm] = Rᵀ R`` (upper Cholesky) the problem is
        ``Y = R T_p``.

        Parameters
        ----------
        H : (n, n) array_like
            Symmetric positive semi-definite Gram matrix.
        T : (n,) or (n, k) array_like
            Targets. A ``dask.array`` keeps the problem lazy: ``Y = R T[perm]`` is formed
            per column chunk (``R`` one graph key) and the solvers return lazy results
            (any shared ordering; not ``"chang_han"``).
        lo, hi : array_like of int
            Box, broadcastable to (n, k).
        scale, offset : array_like or GroupedGrid, optional
            Grid, broadcastable to (n, k), or a :class:`~bils.GroupedGrid` (one value per
            group of coordinates and RHS; never expanded to (n, k)). Original order.
        damp : float
            GPTQ damping: add ``damp * mean(diag(H))`` to the diagonal (after dead
            coordinates — zero diagonal — get ``H_ii = 1`` and target 0).
        ordering : str
            One of :data:`bils.ordering.ORDERINGS` or ``"chang_han"``; ``"diag"`` is
            GPTQ's act-order.

        Examples
        --------
        >>> import numpy as np, bils
        >>> H = np.array([[2.0, 0.5], [0.5, 1.0]])
        >>> p = bils.BILSProblem.from_gram(H, [[1.2], [2.9]], 0, 3, ordering="diag")
        >>> bils.babai(p).x.ravel().tolist()
        [1, 3]

        Device inputs (CuPy arrays or CUDA torch tensors for `H` or `T`) give a problem
        whose arrays live on the device (the Cholesky factor and ``Y`` computed there);
        then `ordering` must be ``"natural"`` or one of the rules that read the diagonal
        only (``"diag"``, ``"reverse"``).
        """
        from ._backend import array_namespace

        xp = array_namespace(H, T)
        if xp is not np:
            return cls._from_gram_xp(xp, H, T, lo, hi, scale=scale, offset=offset, damp=damp, ordering=ordering)
        H = _real_array("H", H)
        if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
            raise ValueError(f"`H` must be a square 2-D array, got shape {H.shape}")
        H = H.astype(np.float64, copy=False)  # not modified below: copies are made where needed
        if not np.all(np.isfinite(H)):
            raise ValueError("`H` must be finite")
        if not _is_symmetric(H):
            raise ValueError("`H` must be symmetric")
        damp = float_iv("damp", damp)
        if damp < 0:
            raise ValueError(f"`damp` must be >= 0, got {damp}")
        n = H.shape[0]
        lazy = is_dask_array(T)  # dask targets: Y = R T[perm] per column chunk, at compute time
        if lazy:
            T, squeeze = _dask.gram_targets(T, n)
        else:
            T = _real_array("T", T)
            if T.ndim not in (1, 2) or T.shape[0] != n:
                raise ValueError(f"`T` must have `H.shape[0]` = {n} rows, got shape {T.shape}")
            squeeze = T.ndim == 1
            T = T.astype(np.float64, copy=False).reshape(n, -1)
            if not np.all(np.isfinite(T)):
                raise ValueError("`T` must be finite")
        # Only the diagonal changes: dead coordinates get H_ii = 1, then damping.
        diag = np.diag(H).copy()
        dead = diag == 0
        diag[dead] = 1.0
        if damp:
            diag += damp * np.mean(diag)
        if dead.any() and not lazy:
            T = T.copy()
            T[dead] = 0.0
        order = "natural" if ordering == "chang_han" else ordering
        choice_iv("ordering", ordering, _ORDER_CHOICES)
        if lazy and ordering == "chang_han":
            raise NotImplementedError("ordering='chang_han' (per-RHS orderings) is not supported "
                                      "with dask targets; use a shared ordering such as 'diag'")
        if order in DIAGONAL_ORDERINGS:  # rules that read the diagonal only
            perm = order_from_diagonal(diag, order)
        else:
            Hd = H.copy()
            Hd[np.diag_indices(n)] = diag
            try:
                perm = column_order(Hd, order)
            except (ValueError, np.linalg.LinAlgError):
                raise ValueError("`H` (after damping) must be positive definite; increase `damp`") from None
            del Hd
        # rows then columns of the permutation (one row gather and one column gather of
        # contiguous rows: cheaper than the fancy index H[np.ix_(perm, perm)], same values)
        Hp = H.take(perm, axis=0).take(perm, axis=1) if order != "natural" else np.array(H, order="C")
        Hp[np.diag_indices(n)] = diag[perm]
        R = _upper_cholesky_inplace(Hp)
        if R is None:
            raise ValueError("`H` (after damping) must be positive definite; increase `damp`")
        if lazy:
            return _dask.gram_problem(cls, R, T, None if order == "natural" else perm, dead,
                                      lo, hi, scale, offset, squeeze)
        Y = _triangular_times(R, T[perm])
        prob = cls._build(R, Y, *(_rows2(nm, a, perm, n, squeeze) for nm, a in
                            (("lo", lo), ("hi", hi), ("scale", scale), ("offset", offset))), squeeze,
                          "natural", np.zeros(T.shape[1]), gram=None, dead=dead)
        if ordering == "chang_han":
            return cls._build(R, Y, lo, hi, scale, offset, squeeze, "chang_han",
                              np.zeros(T.shape[1]), gram=None, dead=dead)
        return cls(prob.R, prob.Y, prob.lo, prob.hi, prob.scale, prob.offset,
                   None if order == "natural" else perm, prob.cost_offset, dead, squeeze)

    @classmethod
    def _from_gram_xp(cls, xp, H, T, lo, hi, *, scale=None, offset=None, damp=0.0, ordering="natural"):
        """:meth:`from_gram` in the array namespace `xp` (CuPy for device inputs): the same
        steps (dead coordinates, damping, diagonal ordering, upper Cholesky, ``Y = R T_p``)
        written with the array API that numpy and CuPy share, so the arrays stay where they
        are; only the diagonal (n numbers) goes to the host for the ordering. Tested with
        ``xp = numpy`` against :meth:`from_gram`."""
        H = xp.asarray(H)
        if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
            raise ValueError(f"`H` must be a square 2-D array, got shape {H.shape}")
        if H.dtype.kind not in "fiu":
            raise TypeError(f"`H` must be a real numeric array, got dtype {H.dtype}")
        H = H.astype(np.float64, copy=False)
        if not bool(xp.all(xp.isfinite(H))):
            raise ValueError("`H` must be finite")
        amax = float(xp.abs(H).max())
        if not bool(xp.all(xp.abs(H - H.T) <= 1e-12 * max(1.0, amax) + 1e-10 * xp.abs(H.T))):
            raise ValueError("`H` must be symmetric")
        damp = float_iv("damp", damp)
        if damp < 0:
            raise ValueError(f"`damp` must be >= 0, got {damp}")
        choice_iv("ordering", ordering, _ORDER_CHOICES)
        if ordering != "natural" and ordering not in DIAGONAL_ORDERINGS:
            raise ValueError(f"`ordering` must be 'natural' or one of {DIAGONAL_ORDERINGS} for device "
                             f"arrays (the others factor on the host), got {ordering!r}")
        n = H.shape[0]
        T = xp.asarray(T)
        if T.ndim not in (1, 2) or T.shape[0] != n:
            raise ValueError(f"`T` must have `H.shape[0]` = {n} rows, got shape {T.shape}")
        squeeze = T.ndim == 1
        T = T.astype(np.float64, copy=False).reshape(n, -1)
        if not bool(xp.all(xp.isfinite(T))):
            raise ValueError("`T` must be finite")
        diag = xp.diag(H).copy()
        dead = diag == 0
        diag[dead] = 1.0
        if damp:
            diag += damp * xp.mean(diag)
        if bool(dead.any()):
            T = T.copy()
            T[dead] = 0.0
        if ordering == "natural":
            perm = None
            Hp = H.copy()
        else:
            perm = xp.asarray(order_from_diagonal(_host(diag), ordering))
            Hp = H[perm][:, perm]
        idx = xp.arange(n)
        Hp[idx, idx] = diag if perm is None else diag[perm]
        try:
            L = xp.linalg.cholesky(Hp)  # CuPy returns NaNs where numpy raises
        except np.linalg.LinAlgError:
            L = xp.full((1, 1), np.nan)
        del Hp
        if not bool(xp.all(xp.isfinite(xp.diag(L)))):
            raise ValueError("`H` (after damping) must be positive definite; increase `damp`")
        R = xp.ascontiguousarray(xp.triu(L.T))  # whatever the library left above L's diagonal
        del L
        Y = R @ (T if perm is None else T[perm])

        def grid(name, a, default, dtype):
            a = xp.full((1, 1), default, dtype=dtype) if a is None else xp.asarray(a)
            if a.ndim == 0:
                a = a.reshape(1, 1)
            elif a.ndim == 1:
                a = a.reshape(-1, 1) if squeeze else a.reshape(1, -1)
            if a.ndim != 2 or a.shape[0] not in (1, n) or a.shape[1] not in (1, T.shape[1]):
                raise ValueError(f"`{name}` of shape {a.shape} must be broadcastable to ({n}, {T.shape[1]})")
            if a.shape[0] == n and n > 1 and perm is not None:
                a = a[perm]
            return a.astype(dtype, copy=False)

        grids = [grid("lo", lo, 0, np.int64), grid("hi", hi, 0, np.int64),
                 grid("scale", scale, 1.0, np.float64), grid("offset", offset, 0.0, np.float64)]
        problem_iv(R, Y, *grids, xp=xp)  # the box and grid checks of every problem
        return cls(R, Y, *grids, perm, xp.zeros(T.shape[1]), _host(dead), squeeze)

    @classmethod
    def _build(cls, R, Y, lo, hi, scale, offset, squeeze, ordering, cost_offset, *, gram, dead):
        ordering = choice_iv("ordering", ordering, _ORDER_CHOICES)
        Y = np.asarray(Y)
        if squeeze and Y.ndim == 2 and Y.shape[1] == 1:
            Y = Y[:, 0]
        can = problem_iv(R, Y, lo, hi, scale, offset)  # validates shapes once, original order
        n, k = can.Y.shape
        grids = [_grid_2d(nm, a, n, k, d, squeeze) for nm, a, d in
                 (("lo", lo, 0), ("hi", hi, 0), ("scale", scale, 1.0), ("offset", offset, 0.0))]
        grids = [g if isinstance(g, GroupedGrid) else g.astype(t, copy=False)
                 for g, t in zip(grids, (np.int64, np.int64, np.float64, np.float64))]
        if ordering == "natural":
            return cls(can.R, can.Y, *grids, None, np.asarray(cost_offset, float), dead, squeeze)
        if ordering == "chang_han":
            perm = chang_han(can.R, can.Y, can.lo, can.hi, can.scale, can.offset)
            return cls(can.R, can.Y, *grids, perm, np.asarray(cost_offset, float), dead, squeeze)
        G = gram if gram is not None else can.R.T @ can.R
        try:
            perm = column_order(G, ordering)
        except (ValueError, np.linalg.LinAlgError):
            name = "A" if gram is not None else "R"
            raise ValueError(f"`{name}` is too ill-conditioned for ordering={ordering!r}: its Gram "
                             "matrix is not numerically positive definite") from None
        Q, Rp = np.linalg.qr(can.R[:, perm])
        sign = np.sign(np.diag(Rp))
        sign[sign == 0] = 1.0
        Rp = sign[:, None] * Rp
        Yp = (Q * sign[None, :]).T @ can.Y
        grids = [_rows(g, perm) for g in grids]
        return cls(np.triu(Rp), Yp, *grids, perm, np.asarray(cost_offset, float), dead, squeeze)

    # ------------------------------------------------------------------ helpers
    def canonical(self):
        """Validated solve-order arrays (see :func:`bils._validate.problem_iv`)."""
        return problem_iv(self.R, self.Y, self.lo, self.hi, self.scale, self.offset)

    def rhs_subproblem(self, j):
        """Solve-order (R, y, lo, hi, scale, offset, perm) for RHS ``j`` of a per-RHS ordering."""
        p = self.perm[:, j]
        Q, Rp = np.linalg.qr(self.R[:, p])
        sign = np.sign(np.diag(Rp))
        sign[sign == 0] = 1.0
        Rp = np.triu(sign[:, None] * Rp)
        y = (Q * sign[None, :]).T @ self.Y[:, j]
        col = lambda a: (a.col(j) if isinstance(a, GroupedGrid)  # noqa: E731
                         else a[:, j] if a.shape[1] > 1 else a[:, 0])
        pick = lambda a: (col(a)[p] if a.shape[0] > 1 else col(a))  # noqa: E731
        return Rp, y, pick(self.lo), pick(self.hi), pick(self.scale), pick(self.offset), p

    def cost(self, x):
        """Cost of ``x`` (original coordinate order), per RHS, including ``cost_offset``.

        ``x`` : (n,) or (n, k) integer codes (any box); raises ``ValueError`` for other
        shapes, non-integral or non-finite values, or a cost that overflows.
        """
        x2 = _codes_iv(x, self.n, self.k)
        with np.errstate(over="ignore", invalid="ignore"):
            out = self._cost(x2)
        if not np.all(np.isfinite(out)):
            raise ValueError("the cost of `x` overflows float64: `x` is far outside the box")
        return out

    def _cost(self, x2):
        if self.perm is None:
            xs = x2
        elif self.perm.ndim == 1:
            xs = x2[self.perm]
        else:
            out = np.empty(self.k)
            for j in range(self.k):
                R, y, lo, hi, s, o, p = self.rhs_subproblem(j)
                z = s * x2[p, j] + o
                out[j] = np.sum((y - R @ z) ** 2)
            return out + self.cost_offset
        S, O = self.canonical().dense_grids()
        r = self.Y - self.R @ (S * xs + O)
        return np.sum(r * r, axis=0) + self.cost_offset


def _rows2(name, a, perm, n, squeeze):
    """Permute the rows of a grid array given in original order (None passes through)."""
    if a is None:
        return None
    if isinstance(a, GroupedGrid):
        return a.permuted(perm) if a.n == n else a  # a wrong length is reported by problem_iv
    a = _real_array(name, a)
    if (a.ndim == 2 or (a.ndim == 1 and squeeze)) and a.shape[0] == n and n > 1:
        return a[perm]
    return a


def _array_meta(name, a):
    """``a`` as an array for shape checks: numpy input is validated by ``_real_array``; device
    (CuPy) and lazy (dask) arrays are checked by dtype only, never copied or computed."""
    mod = type(a).__module__
    if mod.startswith(("cupy", "dask", "torch")):
        if getattr(a, "dtype", None) is None or np.dtype(str(a.dtype).replace("torch.", "")).kind not in "fiu":
            raise TypeError(f"`{name}` must hold real numbers, got dtype {getattr(a, 'dtype', None)}")
        return a
    return _real_array(name, a)


def _problem_fields_iv(p):
    """Validate the fields of a :class:`BILSProblem` (shapes, ``perm``, ``cost_offset``, ...).

    Cheap checks only (``O(n k)``): the values of ``R``, ``Y`` and the grids are checked by
    :func:`bils._validate.problem_iv` when a solver uses the problem. Fields are
    normalised in place (``perm`` to int64, ``cost_offset`` to a float (k,) array).
    """
    put = lambda name, v: object.__setattr__(p, name, v)  # noqa: E731 - frozen dataclass
    R = _array_meta("R", p.R)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"`R` must be a square 2-D (n, n) array with n >= 1, got shape {R.shape}")
    n = R.shape[0]
    Y = _array_meta("Y", p.Y)
    if Y.ndim != 2 or Y.shape[0] != n or Y.shape[1] == 0:
        raise ValueError(f"`Y` must be a 2-D ({n}, k) array with k >= 1, got shape {Y.shape}")
    k = Y.shape[1]
    for name in ("lo", "hi", "scale", "offset"):
        a = getattr(p, name)
        if isinstance(a, GroupedGrid):
            if a.n != n or a.values.shape[1] not in (1, k):
                raise ValueError(f"`{name}` (a GroupedGrid) must have {n} rows and values of shape "
                                 f"(g, {k}) or (g, 1), got n = {a.n}, values {a.values.shape}")
            continue
        a = _array_meta(name, a)
        if a.ndim != 2 or a.shape[0] not in (1, n) or a.shape[1] not in (1, k):
            raise ValueError(f"`{name}` must be a 2-D array of shape ({n} or 1, {k} or 1), "
                             f"got shape {a.shape}")
    def host(a):  # small fields of device problems are checked on a host copy
        return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)

    on_device = type(p.R).__module__.startswith("cupy")
    if p.perm is not None:
        perm = host(p.perm)
        if perm.dtype.kind not in "iu" or perm.ndim not in (1, 2) or perm.shape[0] != n \
                or (perm.ndim == 2 and perm.shape[1] != k):
            raise ValueError(f"`perm` must be an integer array of shape ({n},) or ({n}, {k}), "
                             f"got dtype {perm.dtype} and shape {perm.shape}")
        cols = perm.reshape(n, -1)
        if np.any(cols < 0) or np.any(cols >= n) or \
                np.any(np.sort(cols, axis=0) != np.arange(n)[:, None]):
            raise ValueError(f"`perm` must be a permutation of range({n})"
                             + (" in every column" if perm.ndim == 2 else ""))
        if not on_device:
            put("perm", perm.astype(np.int64, copy=False))
    co = _real_array("cost_offset", host(p.cost_offset)).astype(np.float64, copy=False)
    if co.ndim > 1 or (co.ndim == 1 and co.shape[0] not in (1, k)):
        raise ValueError(f"`cost_offset` must be a scalar or of shape ({k},), got shape {co.shape}")
    if not np.all(np.isfinite(co)) or np.any(co < 0):
        raise ValueError("`cost_offset` must be finite and >= 0")
    if not on_device:
        put("cost_offset", np.broadcast_to(co, (k,)).copy() if co.shape != (k,) else co)
    if p.dead is not None:
        dead = host(p.dead)
        if dead.dtype != bool or dead.shape != (n,):
            raise ValueError(f"`dead` must be None or a boolean array of shape ({n},)")
    if not isinstance(p.squeeze, (bool, np.bool_)):
        raise TypeError(f"`squeeze` must be a bool, got {type(p.squeeze).__name__}")
    if p.squeeze and k != 1:
        raise ValueError(f"`squeeze=True` needs a single right-hand side, got k={k}")


def _codes_iv(x, n, k):
    """``x`` as a float64 (n, k) array of finite integers, or ``ValueError``."""
    x = _real_array("x", x)
    if x.size != n * k or x.ndim not in (1, 2) or x.shape[0] != n:
        raise ValueError(f"`x` must have shape ({n},) or ({n}, {k}), got {x.shape}")
    x = x.reshape(n, k).astype(np.float64)
    if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
        raise ValueError("`x` must hold finite integers (codes)")
    return x

r"""Grouped grids: ``scale`` / ``offset`` given per (group of rows, RHS) plus a group map.

Quantization grids are group-wise: every run of ``g`` input coordinates shares one scale and
one zero point per output channel. Written per coordinate they are (n, k) arrays holding
``n / g`` distinct rows; a :class:`GroupedGrid` stores the distinct rows once,

.. math::

    S_{ij} = V_{\gamma(i),\, j}, \qquad V \in \mathbb{R}^{g \times k},\;
    \gamma : \{0, \dots, n-1\} \to \{0, \dots, g-1\},

and every solver reads ``V[γ(i), j]`` where it used to read ``S[i, j]``. Orderings permute
the group map (``γ ∘ perm``) and leave ``V`` alone, so nothing of size (n, k) is ever built.

Internally every grid is a :class:`GroupedGrid` (a per-coordinate (n, k) array is the grid
with ``γ = identity``; a per-RHS (1, k) or scalar one has a single group).
"""

from __future__ import annotations

import numpy as np

__all__ = ["GroupedGrid"]


def _readonly(a):
    v = a.view()
    v.flags.writeable = False
    return v


class GroupedGrid:
    r"""A grid (``scale`` or ``offset``) with one value per (group of rows, RHS).

    Pass it wherever a solver or :class:`~bils.BILSProblem` takes ``scale`` or ``offset``:
    row ``i`` of the grid is ``values[groups[i]]``. Solvers broadcast it inside their
    kernels; the (n, k) array it stands for is never formed.

    Parameters
    ----------
    values : (g,) or (g, k) array_like of float
        One row per group: ``(g, k)`` gives one value per group and RHS, ``(g,)`` (or
        ``(g, 1)``) one value per group shared by every RHS. Finite.
    groups : (n,) array_like of int
        Group of each coordinate (row of ``R``, in the caller's original order), each in
        ``[0, g)``. Groups need not be contiguous or all used.

    Attributes
    ----------
    values : (g, k or 1) ndarray of float64, read-only
    groups : (n,) ndarray of int64, read-only

    See Also
    --------
    GroupedGrid.from_group_size : contiguous groups of a fixed size (GPTQ's ``g_idx``).

    Notes
    -----
    Memory: ``g k + n`` numbers instead of ``n k``. For a 4096 x 4096 layer with groups of
    128 that is 1 MiB instead of 128 MiB per grid.

    Examples
    --------
    Four coordinates in two groups of two, three right-hand sides:

    >>> import numpy as np, bils
    >>> S = bils.GroupedGrid([[0.5, 1.0, 2.0], [0.25, 0.5, 1.0]], [0, 0, 1, 1])
    >>> S.shape, S.n_groups
    ((4, 3), 2)
    >>> S.dense()[:, 0].tolist()
    [0.5, 0.5, 0.25, 0.25]
    >>> R = np.eye(4)
    >>> Y = np.array([[1.0], [1.0], [0.5], [1.0]]) * [1.0, 2.0, 4.0]
    >>> bils.babai(R, Y, 0, 7, scale=S, backend="numpy").x[:, 0].tolist()
    [2, 2, 2, 4]
    """

    __slots__ = ("values", "groups")

    def __init__(self, values, groups):
        from ._validate import _real_array

        v = _real_array("GroupedGrid values", values)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError("`GroupedGrid` `values` must be a non-empty (g,) or (g, k) array, "
                             f"got shape {np.shape(values)}")
        v = np.ascontiguousarray(v, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError("`GroupedGrid` `values` must be finite (no NaN or inf)")
        g = np.asarray(groups)
        if g.ndim != 1 or g.shape[0] == 0:
            raise ValueError("`GroupedGrid` `groups` must be a non-empty 1-D array (one group "
                             f"index per coordinate), got shape {g.shape}")
        if g.dtype.kind not in ("i", "u"):
            raise TypeError(f"`GroupedGrid` `groups` must hold integers, got dtype {g.dtype}")
        g = np.ascontiguousarray(g, dtype=np.int64)
        if g.min() < 0 or g.max() >= v.shape[0]:
            raise ValueError(f"`GroupedGrid` `groups` must lie in [0, {v.shape[0]}) (the rows of "
                             f"`values`), got values in [{g.min()}, {g.max()}]")
        object.__setattr__(self, "values", _readonly(v))
        object.__setattr__(self, "groups", _readonly(g))

    @classmethod
    def _trusted(cls, values, groups):
        """Construct without validation (``values`` (g, kk) float, ``groups`` (n,) int64)."""
        out = object.__new__(cls)
        object.__setattr__(out, "values", _readonly(np.ascontiguousarray(values)))
        object.__setattr__(out, "groups", _readonly(np.ascontiguousarray(groups, dtype=np.int64)))
        return out

    def __setattr__(self, name, value):
        raise AttributeError("GroupedGrid is immutable")

    def __reduce__(self):  # pickling (e.g. to dask workers)
        return (GroupedGrid._trusted, (np.asarray(self.values), np.asarray(self.groups)))

    @classmethod
    def from_group_size(cls, values, group_size, n):
        """Contiguous groups: coordinate ``i`` is in group ``i // group_size``.

        Parameters
        ----------
        values : (g,) or (g, k) array_like
            ``g = ceil(n / group_size)`` rows.
        group_size : int
            Coordinates per group (the last group may be shorter).
        n : int
            Number of coordinates.

        Examples
        --------
        >>> import bils
        >>> bils.GroupedGrid.from_group_size([[1.0], [2.0]], 3, 5).groups.tolist()
        [0, 0, 0, 1, 1]
        """
        from ._validate import int_iv

        group_size = int_iv("group_size", group_size, minimum=1)
        n = int_iv("n", n, minimum=1)
        g = -(-n // group_size)
        rows = np.shape(values)[0] if np.ndim(values) else 0
        if rows != g:
            raise ValueError(f"`values` must have ceil(n / group_size) = {g} rows, got {rows}")
        return cls(values, np.arange(n) // group_size)

    @classmethod
    def from_dense(cls, a, n):
        """The grid of a compact (n or 1, k or 1) array (rows with zero stride collapse)."""
        a = np.asarray(a)
        rows = a.shape[0] == 1 or (a.strides[0] == 0 and n > 1)
        index = (slice(0, 1) if rows else slice(None),
                 slice(0, 1) if (a.shape[1] == 1 or a.strides[1] == 0) else slice(None))
        v = a[index]
        groups = np.zeros(n, dtype=np.int64) if rows else np.arange(n, dtype=np.int64)
        return cls._trusted(np.ascontiguousarray(v, dtype=np.float64), groups)

    # ------------------------------------------------------------------ shape
    @property
    def n(self) -> int:
        """Number of coordinates (rows of the grid)."""
        return self.groups.shape[0]

    @property
    def n_groups(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self):
        """``(n, k)``, with ``k = 1`` when every RHS shares the values."""
        return (self.n, self.values.shape[1])

    def __repr__(self):
        return f"GroupedGrid(values shape {self.values.shape}, n={self.n})"

    # ------------------------------------------------------------------ access
    def dense(self, k=None):
        """The grid as a C-contiguous (n, k) array (materialised: ``n k`` numbers).

        ``k`` defaults to the number of columns of ``values``; a shared column is repeated.
        """
        v = self.values[self.groups]
        if k is None or k == v.shape[1]:
            return v
        return np.ascontiguousarray(np.broadcast_to(v, (self.n, k)))

    def row(self, i):
        """Row ``i`` of the grid, shape (k or 1,)."""
        return self.values[self.groups[i]]

    def col(self, j):
        """Column ``j`` of the grid, shape (n,) (``j`` ignored when the values are shared)."""
        jj = j if self.values.shape[1] > 1 else 0
        return self.values[self.groups, jj]

    def cols(self, sl):
        """The grid of RHS columns ``sl`` (a slice)."""
        if self.values.shape[1] == 1:
            return self
        return GroupedGrid._trusted(self.values[:, sl], self.groups)

    def permuted(self, perm):
        """The grid with rows in the order ``perm`` (row ``q`` is old row ``perm[q]``)."""
        return GroupedGrid._trusted(self.values, self.groups[np.asarray(perm)])

    def astype(self, dtype):
        return GroupedGrid._trusted(self.values.astype(dtype, copy=False), self.groups)

    @property
    def is_identity(self) -> bool:
        """Whether row ``i`` is group ``i`` (a per-coordinate grid)."""
        g = self.groups
        return g.shape[0] == self.values.shape[0] and bool(np.all(g == np.arange(g.shape[0])))

    def premultiply(self, R):
        """``R @ S`` for ``R`` (m, n) without forming ``S`` (n, k): ``(R P) V``.

        ``P`` (n, g) is the group indicator, so ``R P`` sums the columns of ``R`` per group
        (``O(m n)``), then one product with ``V`` (``O(m g k)``).
        """
        R = np.asarray(R)
        if not np.any(self.values):  # the default offset: exactly 0 (even for huge R)
            return np.zeros((R.shape[0], self.values.shape[1]), dtype=R.dtype)
        if self.is_identity:
            return R @ self.values.astype(R.dtype, copy=False)
        # column sums of R per group (stable order: ascending coordinate within a group)
        order = np.argsort(self.groups, kind="stable")
        gs = self.groups[order]
        starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
        RP = np.zeros((R.shape[0], self.n_groups), dtype=R.dtype)
        RP[:, gs[starts]] = np.add.reduceat(R[:, order], starts, axis=1)
        return RP @ self.values.astype(R.dtype, copy=False)

    def min_abs_scaled(self, d):
        r"""``min_i |d_i S_ij|`` per RHS ``j`` (k or 1,), for ``d`` (n,)."""
        d = np.abs(np.asarray(d, dtype=np.float64))
        g = self.n_groups
        dmin = np.full(g, np.inf)
        np.minimum.at(dmin, self.groups, d)
        used = np.isfinite(dmin)
        return np.min(dmin[used, None] * np.abs(self.values[used]), axis=0)

"""A BILS test problem as plain arrays, and the conversions the oracles and assertions share.

Nothing here imports hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .._grid import GroupedGrid

__all__ = ["ProblemCase", "as_case", "unpack_result", "format_array"]


def format_array(a) -> str:
    """``np.array([...])`` source text that round-trips ``a`` exactly (shortest float repr)."""
    a = np.asarray(a)
    body = np.array2string(a, separator=", ", floatmode="unique", threshold=10**9,
                           max_line_width=100)
    body = body.replace("\n", "\n" + " " * 13)
    dtype = "" if a.dtype.kind == "f" else f", dtype=np.{a.dtype}"
    return f"np.array({body}{dtype})"


def _as_int_bounds(name, a):
    a = np.asarray(a)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"`{name}` must hold integers")
    elif a.dtype.kind not in "iu":
        raise TypeError(f"`{name}` must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _col_shape(a, squeeze):
    a = np.asarray(a)
    if squeeze and a.ndim == 1:
        return a[:, None]
    return a


@dataclass(frozen=True, eq=False)
class ProblemCase:
    r"""One multi-RHS BILS problem, ``min ||Y - A (S∘X + O)||² + c0`` over ``lo <= X <= hi``.

    This is what the strategies in :mod:`bils.testing.strategies` draw and what every
    oracle and assertion in :mod:`bils.testing` accepts.

    Attributes
    ----------
    R : (n, n) ndarray
        The basis. Upper triangular (with a non-zero diagonal) for problems a solver is
        called on; any square matrix for problems only *checked* (a
        :class:`bils.BILSProblem` with an ordering, seen in the caller's coordinates).
    Y : (n, k) ndarray
        Right-hand sides.
    lo, hi : ndarray of int64
        Box, broadcastable to ``(n, k)``.
    scale, offset : ndarray or None
        Grid, broadcastable to ``(n, k)``; ``None`` means 1 and 0 (and is passed to
        solvers as ``None``, exercising their defaults).
    x_true : (n, k) ndarray of int64 or None
        The planted point of a noiseless problem (``Y = R (S∘x_true + O)`` exactly up to
        floating point), else ``None``.
    cost_offset : (k,) ndarray or None
        Constant added to every cost (a tall design matrix's residual outside
        ``range(A)``).
    label : str
        How the problem was built, e.g. ``"well/noisy/grid=rhs"``.
    exact : bool
        All data are dyadic rationals with few bits, so every solver's arithmetic is
        exact: ties are real ties and results can be compared bit for bit.
    squeeze : bool
        The problem came with a single 1-D right-hand side (results have ``x`` (n,)).
    triangular : bool
        ``R`` is upper triangular with a non-zero diagonal, so solvers can be called on
        the problem (:meth:`solve`); otherwise it can only be checked.

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import ProblemCase, assert_recovers
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> x_true = np.array([[1, 0], [-1, 2]])  # planted points, one column per RHS
    >>> case = ProblemCase(R, R @ x_true, lo=np.array(-2), hi=np.array(2), x_true=x_true,
    ...                    label="noiseless")
    >>> case.n, case.k, case.box_points.tolist()
    (2, 2, [25.0, 25.0])
    >>> res = case.solve(bils.babai, backend="numpy")
    >>> res.x.tolist(), case.cost(res.x).tolist()
    ([[1, 0], [-1, 2]], [0.0, 0.0])
    >>> assert_recovers(res, case)
    >>> case.column(1).Y.tolist()  # RHS 1 alone: R @ [0, 2]
    [[2.0], [2.0]]
    """

    R: np.ndarray
    Y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    x_true: np.ndarray | None = None
    cost_offset: np.ndarray | None = None
    label: str = ""
    exact: bool = False
    squeeze: bool = False
    triangular: bool = True

    # ------------------------------------------------------------------ shapes
    @property
    def n(self) -> int:
        return self.R.shape[0]

    @property
    def k(self) -> int:
        return self.Y.shape[1]

    def full(self, name):
        """``lo``, ``hi``, ``scale`` or ``offset`` broadcast to ``(n, k)`` (read-only view)."""
        default = {"scale": 1.0, "offset": 0.0}.get(name)
        a = getattr(self, name)
        if a is None:
            a = np.full((1, 1), default)
        return np.broadcast_to(a, (self.n, self.k))

    @property
    def box_points(self) -> np.ndarray:
        """Number of box points per RHS, (k,) float (may exceed int64)."""
        w = (self.full("hi") - self.full("lo") + 1).astype(np.float64)
        return np.prod(w, axis=0)

    # ------------------------------------------------------------------ solving
    @property
    def kwargs(self) -> dict:
        return {"scale": self.scale, "offset": self.offset}

    def solve(self, solver, **options):
        """``solver(R, Y, lo, hi, scale=..., offset=..., **options)``."""
        if not self.triangular:
            raise ValueError("this case has a non-triangular basis: it can be checked, not solved")
        Y = self.Y[:, 0] if self.squeeze else self.Y
        return solver(self.R, Y, self.lo, self.hi, **self.kwargs, **options)

    def cost(self, x) -> np.ndarray:
        """Recomputed cost ``||y_j - R (s_j∘x_j + o_j)||² (+ cost_offset)`` per RHS, (k,)."""
        x = np.asarray(x, dtype=np.float64).reshape(self.n, self.k)
        z = self.full("scale") * x + self.full("offset")
        r = self.Y - self.R @ z
        c = np.sum(r * r, axis=0)
        if self.cost_offset is not None:
            c = c + self.cost_offset
        return c

    def cost_tolerance(self, x, rtol) -> np.ndarray:
        """Absolute tolerance per RHS for comparing costs of ``x`` computed in different ways."""
        x = np.asarray(x, dtype=np.float64).reshape(self.n, self.k)
        z = self.full("scale") * x + self.full("offset")
        rz = np.abs(self.R) @ np.abs(z)
        mag = np.sum(self.Y * self.Y, axis=0) + np.sum(rz * rz, axis=0)
        if self.cost_offset is not None:
            mag = mag + np.abs(self.cost_offset)
        return rtol * (1.0 + mag)

    # ------------------------------------------------------------------ derived cases
    def column(self, j) -> "ProblemCase":
        """RHS ``j`` alone, as a 1-RHS (2-D) problem."""
        return self.columns([j])

    def columns(self, cols) -> "ProblemCase":
        """The RHS in ``cols`` (a list of indices), as a 2-D problem."""
        cols = list(cols)

        def pick(a):
            if a is None:
                return None
            a = np.asarray(a)
            if a.ndim == 2 and a.shape[1] > 1:
                return a[:, cols]
            return a

        return replace(
            self,
            Y=self.Y[:, cols],
            lo=pick(self.lo), hi=pick(self.hi), scale=pick(self.scale), offset=pick(self.offset),
            x_true=None if self.x_true is None else self.x_true[:, cols],
            cost_offset=None if self.cost_offset is None else self.cost_offset[cols],
            squeeze=False,
        )

    def translate(self, shift) -> "ProblemCase":
        r"""The problem moved by the integer vector ``shift`` (broadcastable to (n, k)).

        ``Y + R (S∘shift)`` with box ``[lo + shift, hi + shift]``: a solver that is
        equivariant returns ``x + shift``.
        """
        t = np.asarray(shift)
        if t.dtype.kind not in "iu":
            raise TypeError("`shift` must hold integers")
        t = t.astype(np.int64)
        if t.ndim == 1:
            t = t[:, None]
        tf = np.broadcast_to(t, (self.n, self.k))
        Y = self.Y + self.R @ (self.full("scale") * tf)
        lo = np.asarray(self.lo) + t
        hi = np.asarray(self.hi) + t
        x_true = None if self.x_true is None else self.x_true + tf
        return replace(self, Y=Y, lo=lo, hi=hi, x_true=x_true,
                       label=self.label + "/translated")

    def problem(self, ordering="natural"):
        """The same problem as a :class:`bils.BILSProblem` (``from_triangular``)."""
        from bils.problem import BILSProblem

        Y = self.Y[:, 0] if self.squeeze else self.Y
        return BILSProblem.from_triangular(self.R, Y, self.lo, self.hi, scale=self.scale,
                                           offset=self.offset, ordering=ordering)

    # ------------------------------------------------------------------ display
    def source(self) -> str:
        """Python source that rebuilds the arrays (for failure messages)."""
        lines = [f"R = {format_array(self.R)}", f"Y = {format_array(self.Y)}",
                 f"lo = {format_array(self.lo)}", f"hi = {format_array(self.hi)}"]
        if self.scale is not None:
            lines.append(f"scale = {format_array(self.scale)}")
        if self.offset is not None:
            lines.append(f"offset = {format_array(self.offset)}")
        if self.cost_offset is not None and np.any(self.cost_offset):
            lines.append(f"cost_offset = {format_array(self.cost_offset)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        head = f"ProblemCase(n={self.n}, k={self.k}, label={self.label!r}"
        if self.exact:
            head += ", exact=True"
        body = self.source().replace("\n", "\n    ")
        extra = "" if self.x_true is None else f"\n    x_true = {format_array(self.x_true)}"
        return f"{head}):\n    {body}{extra}"


def as_case(problem) -> ProblemCase:
    """Turn what a user may pass as a problem into a :class:`ProblemCase`.

    Accepts a :class:`ProblemCase`, a :class:`bils.BILSProblem` (seen in the caller's
    coordinate order, whatever its ordering), or a tuple ``(R, Y, lo, hi[, scale[,
    offset]])`` with the solvers' broadcasting rules (a 1-D ``Y`` is one RHS).

    Parameters
    ----------
    problem : ProblemCase, BILSProblem or tuple
        A :class:`ProblemCase` (returned as is), a :class:`bils.BILSProblem`, or
        ``(R, Y, lo, hi[, scale[, offset]])``: ``R`` (n, n) square (it need not be
        triangular to be checked), ``Y`` (n,) or (n, k), integer bounds ``lo``, ``hi``
        and optional grid ``scale``, ``offset``, all broadcastable to ``Y``'s shape as
        (n, k).

    Returns
    -------
    ProblemCase

    Raises
    ------
    TypeError
        If `problem` is none of the above, or a bound is not of an integer or float
        dtype.
    ValueError
        If ``R`` is not square, a bound is not integer-valued, or an array does not
        broadcast to ``Y``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> from bils.testing import as_case
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> case = as_case((R, np.array([3.125, 0.875]), -2, 2))
    >>> case.n, case.k, case.squeeze, case.triangular
    (2, 1, True, True)
    >>> as_case(case) is case
    True
    >>> as_case(R)
    Traceback (most recent call last):
        ...
    TypeError: `problem` must be a ProblemCase, a bils.BILSProblem or a tuple (R, Y, lo, hi[, scale[, offset]]), got ndarray
    """
    if isinstance(problem, ProblemCase):
        return problem
    from bils.problem import BILSProblem

    if isinstance(problem, BILSProblem):
        return _case_from_bilsproblem(problem)
    if isinstance(problem, (tuple, list)) and 4 <= len(problem) <= 6:
        R, Y, lo, hi, *rest = problem
        scale = rest[0] if len(rest) > 0 else None
        offset = rest[1] if len(rest) > 1 else None
        return _case_from_arrays(R, Y, lo, hi, scale, offset)
    raise TypeError("`problem` must be a ProblemCase, a bils.BILSProblem or a tuple "
                    f"(R, Y, lo, hi[, scale[, offset]]), got {type(problem).__name__}")


def _case_from_arrays(R, Y, lo, hi, scale, offset):
    R = np.asarray(R, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"`R` must be a square 2-D array, got shape {R.shape}")
    squeeze = Y.ndim == 1
    Y = Y.reshape(R.shape[0], -1)
    shape = Y.shape
    lo = _col_shape(_as_int_bounds("lo", lo), squeeze)
    hi = _col_shape(_as_int_bounds("hi", hi), squeeze)
    grids = []
    for name, a in (("scale", scale), ("offset", offset)):
        if a is not None:
            a = _col_shape(np.asarray(a, dtype=np.float64), squeeze)
        grids.append(a)
    for name, a in (("lo", lo), ("hi", hi), ("scale", grids[0]), ("offset", grids[1])):
        if a is not None:
            try:
                np.broadcast_to(a, shape)
            except ValueError:
                raise ValueError(f"`{name}` must be broadcastable to `Y.shape` {shape}") from None
    triangular = bool(np.all(np.tril(R, -1) == 0) and np.all(np.diag(R) != 0))
    return ProblemCase(R, Y, lo, hi, grids[0], grids[1], squeeze=squeeze, triangular=triangular)


def _case_from_bilsproblem(p):
    n, k = p.n, p.k

    def full(a):
        if isinstance(a, GroupedGrid):
            a = a.dense()
        return np.broadcast_to(np.asarray(a), (n, k))

    R, lo, hi, S, O = p.R, full(p.lo), full(p.hi), full(p.scale), full(p.offset)
    if p.perm is not None and p.perm.ndim == 1:
        # solve position q holds original coordinate perm[q]: x_solve = x[perm]
        inv = np.argsort(p.perm)
        R = R[:, inv]
        lo, hi, S, O = lo[inv], hi[inv], S[inv], O[inv]
    # a 2-D perm (per-RHS ordering) keeps R, Y and the grids in the original order
    triangular = bool(np.all(np.tril(R, -1) == 0) and np.all(np.diag(R) != 0))
    co = np.asarray(p.cost_offset, dtype=np.float64)
    return ProblemCase(np.asarray(R, float), np.asarray(p.Y, float), lo.astype(np.int64),
                       hi.astype(np.int64), np.array(S, float), np.array(O, float),
                       cost_offset=co if np.any(co) else None, label="BILSProblem",
                       squeeze=p.squeeze, triangular=triangular)


def unpack_result(result, case: ProblemCase):
    """``(x (n, k) ndarray, reported cost (k,) or None, status or None)`` from a solver output.

    Accepts anything with ``.x`` (and optionally ``.cost``, ``.status``) — a
    :class:`bils.BILSResult` — or a bare array ``x``. Raises ``AssertionError`` when
    the shapes do not fit the problem.
    """
    x = getattr(result, "x", result)
    cost = getattr(result, "cost", None)
    status = getattr(result, "status", None)
    x = np.asarray(x)
    n, k = case.n, case.k
    expected = (n,) if case.squeeze else (n, k)
    if x.shape != expected:
        raise AssertionError(f"`x` has shape {x.shape}, expected {expected} for this problem")
    x = x.reshape(n, k)
    if cost is not None:
        cost = np.asarray(cost, dtype=np.float64)
        ce = () if case.squeeze else (k,)
        if cost.shape != ce:
            raise AssertionError(f"`cost` has shape {cost.shape}, expected {ce}")
        cost = cost.reshape(k)
    if status is not None:
        status = np.asarray(status).reshape(-1)
    return x, cost, status

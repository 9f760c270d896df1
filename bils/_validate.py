"""Input validation shared by every public function (``*_iv`` helpers).

Each helper returns canonical arrays or raises ``ValueError`` / ``TypeError`` whose
message names the argument and the rule, e.g. "`lo` must not exceed `hi`".
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field

import numpy as np

from ._grid import GroupedGrid
from ._guard import (_compact, array_magnitudes, bounds_iv, fused_passes, level_weights_iv,
                     magnitudes)

__all__ = ["Canonical", "problem_iv", "grid_iv", "int_iv", "float_iv", "choice_iv"]


@dataclass(frozen=True)
class Canonical:
    """Canonical arrays of a multi-RHS BILS problem (float64 / int64).

    The arrays live in one array namespace (:attr:`xp`): numpy, or cupy for inputs on a
    GPU. ``lo`` and ``hi`` are read-only broadcast views of shape (n, k). On the host,
    ``scale`` and ``offset`` are :class:`~bils.GroupedGrid` s (values (g, k or 1), group
    map (n,)): row ``i`` is ``values[groups[i]]``; kernels read them through the group map.
    On a GPU they are broadcast views of shape (n, k). A backend without grouped support
    calls :meth:`dense_grids` for (n, k) arrays.
    """

    R: np.ndarray
    Y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    scale: GroupedGrid
    offset: GroupedGrid
    squeeze: bool  # the caller passed a 1-D y
    #: :class:`~bils._guard.Magnitudes` of these arrays, set by :func:`problem_iv` on the
    #: host (reused by later range checks, e.g. for a second working precision). Not an
    #: ``__init__`` argument: ``dataclasses.replace`` and :meth:`astype` make problems
    #: without it, so reductions of other arrays are never reused by mistake.
    magnitudes: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.R.shape[0]

    @property
    def k(self) -> int:
        return self.Y.shape[1]

    @property
    def xp(self):
        """The array namespace of the arrays (numpy or cupy)."""
        return _namespace(self.R)

    def astype(self, dtype):
        """The same problem with ``R``, ``Y`` (contiguous), ``scale`` and ``offset`` in ``dtype``."""
        xp = self.xp

        def cast(grid):
            return grid.astype(dtype) if isinstance(grid, GroupedGrid) else grid.astype(dtype, copy=False)

        return Canonical(xp.ascontiguousarray(self.R, dtype=dtype),
                         xp.ascontiguousarray(self.Y, dtype=dtype), self.lo, self.hi,
                         cast(self.scale), cast(self.offset), self.squeeze)

    def dense_grids(self):
        """``(scale, offset)`` as read-only (n, k) float64 arrays, for backends without grouped grids.

        A grid shared by all coordinates (one group) comes back as a zero-stride broadcast
        view; any other grid is materialised, ``n k`` numbers each. Grids that are already
        arrays (device problems) come back as they are.
        """
        out = []
        for grid in (self.scale, self.offset):
            if not isinstance(grid, GroupedGrid):
                out.append(grid)
                continue
            if grid.n_groups == 1:
                a = grid.values
            else:
                a = grid.values if grid.is_identity else grid.values[grid.groups]
            out.append(np.broadcast_to(a, self.Y.shape))
        return tuple(out)


def _namespace(a):
    """numpy, or cupy for a CuPy array (without importing cupy otherwise)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _real_array(name, a, *, allow_int=True, xp=np):
    if a is None:
        raise TypeError(f"`{name}` is required")
    try:
        arr = xp.asarray(a)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"`{name}` must be array_like of real numbers") from exc
    if arr.dtype == object or arr.dtype.kind not in ("f", "i", "u", "b"):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "b":
        raise TypeError(f"`{name}` must hold real numbers, not booleans")
    if not allow_int and arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    return arr


def _finite(name, arr, xp=np):
    # min and max propagate NaN and reach ±inf: two reductions, no boolean (n, k) temporary
    if arr.dtype.kind == "f" and arr.size and not (bool(xp.isfinite(xp.min(arr)))
                                                   and bool(xp.isfinite(xp.max(arr)))):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")


def _broadcast(name, arr, shape, xp=np):
    try:
        return xp.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(
            f"`{name}` must be broadcastable to `Y.shape` {shape}, got shape {arr.shape}"
        ) from None


def _as_column_shape(arr, squeeze):
    # A 1-D y means a single RHS: per-coordinate arrays of shape (n,) become (n, 1).
    if squeeze and arr.ndim == 1:
        return arr[:, None]
    return arr


def _has_lower_entries(R, rows=256, xp=np):
    """Whether the square ``R`` has a non-zero entry below the diagonal.

    Checked in slabs of ``rows`` rows (only the columns left of each slab's last row), so
    no (n, n) temporary is made: ``np.tril`` of a 4096² factor would allocate 128 MiB on
    every solver call.
    """
    n = R.shape[0]
    for i0 in range(1, n, rows):
        i1 = min(n, i0 + rows)
        # rows i0..i1-1, columns 0..i1-2; entry (r, c) is below the diagonal iff c < r
        if bool(xp.any(xp.tril(R[i0:i1, : i1 - 1], i0 - 1) != 0)):
            return True
    return False


def triangular_iv(R, name="R", xp=np):
    """Validate an upper-triangular factor: square, finite, non-zero diagonal."""
    return _triangular_iv(R, name, xp)[0]


def _triangular_iv(R, name="R", xp=np):
    """:func:`triangular_iv` and ``max_i sum_l |R_il|`` when a fused pass computed it (else None)."""
    R = _real_array(name, R, xp=xp)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"`{name}` must be a square 2-D array, got shape {R.shape}")
    if R.shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one row")
    R = xp.ascontiguousarray(R, dtype=np.float64)
    fused = fused_passes(R.size) if xp is np else None
    rowsum = None
    if fused is not None:  # finiteness, triangularity and row sums in one pass
        non_finite, lower, rowsum = fused.matrix_stats(R)
        if non_finite:
            raise ValueError(f"`{name}` must be finite (no NaN or inf)")
    else:
        _finite(name, R, xp)
        lower = _has_lower_entries(R, xp=xp)
    if lower:
        raise ValueError(f"`{name}` must be upper triangular (entries below the diagonal must be 0)")
    if bool(xp.any(xp.diag(R) == 0)):
        raise ValueError(f"`{name}` must have a non-zero diagonal")
    return R, rowsum


def problem_iv(R, Y, lo, hi, scale=None, offset=None, *, xp=None) -> Canonical:
    """Validate ``R, Y, lo, hi, scale, offset`` and return :class:`Canonical` arrays.

    Validation runs in the array namespace ``xp`` (default: cupy when any input is a
    CuPy array or a CUDA torch tensor, else numpy): device inputs stay on the device and
    only scalars and flags (the outcome of each check) cross to the host.
    """
    if xp is None:
        from ._backend import array_namespace

        xp = array_namespace(R, Y, lo, hi, scale, offset)
    R, rowsum = _triangular_iv(R, xp=xp)
    n = R.shape[0]
    Y = _real_array("Y", Y, xp=xp)
    if Y.ndim not in (1, 2):
        raise ValueError(f"`Y` must be 1-D (n,) or 2-D (n, k), got {Y.ndim}-D")
    if Y.shape[0] != n:
        raise ValueError(f"`Y` must have `R.shape[0]` = {n} rows, got {Y.shape[0]}")
    squeeze = Y.ndim == 1
    Y = xp.ascontiguousarray(Y.reshape(n, -1), dtype=np.float64)
    if Y.shape[1] == 0:
        raise ValueError("`Y` must have at least one column")
    ymax = None
    if xp is np and fused_passes(Y.size) is not None:  # finiteness and column maxima in one pass
        non_finite, _, _, ymax = array_magnitudes(Y, rows=False)
        if non_finite:
            raise ValueError("`Y` must be finite (no NaN or inf)")
    else:
        _finite("Y", Y, xp)
    shape = Y.shape

    bounds = []
    for name, b in (("lo", lo), ("hi", hi)):
        b = _real_array(name, b, xp=xp)
        _finite(name, b, xp)
        if xp is np:
            b = bounds_iv(name, b)  # one safe int64 cast for every dtype (|b| <= 2**52)
        else:
            if b.dtype.kind == "f" and bool(xp.any(b != xp.round(b))):
                raise ValueError(f"`{name}` must hold integers")
            if bool(xp.any(xp.abs(b) > 2**52)):
                raise ValueError(f"`{name}` must have magnitude <= 2**52")
            b = b.astype(np.int64, copy=False)
        b = _broadcast(name, _as_column_shape(b, squeeze), shape, xp)
        bounds.append(b)
    lo, hi = bounds
    # compared in their compact forms (a scalar box is one comparison, not n k)
    lo_c, hi_c = (_compact(b) if xp is np else b for b in (lo, hi))
    if bool(xp.any(lo_c > hi_c)):
        raise ValueError("`lo` must not exceed `hi` (elementwise)")

    if xp is np:  # host: grids stay grouped (never expanded to (n, k))
        scale = grid_iv("scale", scale, 1.0, shape, squeeze)
        non_finite, *s_stats = array_magnitudes(scale.values)
        if non_finite:  # (a dense grid large enough for the fused pass is checked here)
            raise ValueError("`scale` must be finite (no NaN or inf)")
        if np.any(s_stats[0] == 0):  # a row's smallest |s|
            raise ValueError("`scale` must be non-zero")
        offset = grid_iv("offset", offset, 0.0, shape, squeeze)
        non_finite, _, _, o_colmax = array_magnitudes(offset.values, rows=False)
        if non_finite:
            raise ValueError("`offset` must be finite (no NaN or inf)")
        mags = magnitudes(R, Y, scale, offset, rowsum=rowsum, ymax=ymax, s_stats=s_stats[:3],
                          o_colmax=o_colmax)
        level_weights_iv(R, Y, lo, hi, scale, offset, mags=mags)  # R_ii*s_ij, residual bound
        can = Canonical(R, Y, lo, hi, scale, offset, squeeze)
        object.__setattr__(can, "magnitudes", mags)
        return can

    # device arrays: dense broadcast views in the array's namespace
    if isinstance(scale, GroupedGrid):
        scale = xp.asarray(scale.dense(shape[1]))
    if isinstance(offset, GroupedGrid):
        offset = xp.asarray(offset.dense(shape[1]))
    if scale is None:
        scale = xp.ones((1, 1))
    scale = _real_array("scale", scale, xp=xp).astype(np.float64, copy=False)
    _finite("scale", scale, xp)
    if bool(xp.any(scale == 0)):
        raise ValueError("`scale` must be non-zero")
    scale = _broadcast("scale", _as_column_shape(scale, squeeze), shape, xp)

    if offset is None:
        offset = xp.zeros((1, 1))
    offset = _real_array("offset", offset, xp=xp).astype(np.float64, copy=False)
    _finite("offset", offset, xp)
    offset = _broadcast("offset", _as_column_shape(offset, squeeze), shape, xp)
    return Canonical(R, Y, lo, hi, scale, offset, squeeze)


def grid_iv(name, a, default, shape, squeeze):
    """``scale`` / ``offset`` (array_like broadcastable to ``shape`` (n, k), a
    :class:`~bils.GroupedGrid`, or None for ``default``) as a :class:`~bils.GroupedGrid`."""
    n, k = shape
    if a is None:
        return GroupedGrid._trusted(np.full((1, 1), default), np.zeros(n, dtype=np.int64))
    if isinstance(a, GroupedGrid):
        if a.n != n:
            raise ValueError(f"`{name}` (a GroupedGrid) must have one group index per row of "
                             f"`Y` ({n}), got {a.n}")
        if a.values.shape[1] not in (1, k):
            raise ValueError(f"`{name}` (a GroupedGrid) must have values of shape (g, {k}) or "
                             f"(g,) to match `Y` with {k} columns, got {a.values.shape}")
        return a
    if isinstance(a, tuple):
        raise TypeError(f"`{name}` must be array_like or a bils.GroupedGrid, not a tuple; "
                        f"write `{name}=bils.GroupedGrid(values, groups)` for grouped values")
    arr = _real_array(name, a).astype(np.float64, copy=False)
    if fused_passes(arr.size) is None:  # large grids: checked by problem_iv's fused pass
        _finite(name, arr)
    arr = _broadcast(name, _as_column_shape(arr, squeeze), shape)
    return GroupedGrid.from_dense(arr, n)


def int_iv(name, value, *, minimum=None, allow_none=False):
    """An integer option (not bool) with an optional lower bound."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def float_iv(name, value, *, positive=False, allow_none=False):
    """A finite real option, optionally > 0."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite")
    if positive and value <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")
    return value


def choice_iv(name, value, choices):
    """A string option out of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value

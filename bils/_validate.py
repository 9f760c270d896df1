"""Input validation shared by every public function (``*_iv`` helpers).

Each helper returns canonical arrays or raises ``ValueError`` / ``TypeError`` whose
message names the argument and the rule, e.g. "`lo` must not exceed `hi`".
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import numpy as np

from ._guard import bounds_iv, level_weights_iv

__all__ = ["Canonical", "problem_iv", "int_iv", "float_iv", "choice_iv"]


@dataclass(frozen=True)
class Canonical:
    """Canonical arrays of a multi-RHS BILS problem (numpy, float64 / int64).

    ``scale``, ``offset``, ``lo`` and ``hi`` are read-only broadcast views of shape (n, k).
    """

    R: np.ndarray
    Y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    squeeze: bool  # the caller passed a 1-D y

    @property
    def n(self) -> int:
        return self.R.shape[0]

    @property
    def k(self) -> int:
        return self.Y.shape[1]

    def astype(self, dtype):
        """The same problem with ``R``, ``Y`` (contiguous), ``scale`` and ``offset`` in ``dtype``."""
        return Canonical(np.ascontiguousarray(self.R, dtype=dtype),
                         np.ascontiguousarray(self.Y, dtype=dtype), self.lo, self.hi,
                         self.scale.astype(dtype, copy=False), self.offset.astype(dtype, copy=False),
                         self.squeeze)


def _real_array(name, a, *, allow_int=True):
    if a is None:
        raise TypeError(f"`{name}` is required")
    try:
        arr = np.asarray(a)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"`{name}` must be array_like of real numbers") from exc
    if arr.dtype == object or arr.dtype.kind not in ("f", "i", "u", "b"):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "b":
        raise TypeError(f"`{name}` must hold real numbers, not booleans")
    if not allow_int and arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    return arr


def _finite(name, arr):
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")


def _broadcast(name, arr, shape):
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(
            f"`{name}` must be broadcastable to `Y.shape` {shape}, got shape {arr.shape}"
        ) from None


def _as_column_shape(arr, squeeze):
    # A 1-D y means a single RHS: per-coordinate arrays of shape (n,) become (n, 1).
    if squeeze and arr.ndim == 1:
        return arr[:, None]
    return arr


def _has_lower_entries(R, rows=256):
    """Whether the square ``R`` has a non-zero entry below the diagonal.

    Checked in slabs of ``rows`` rows (only the columns left of each slab's last row), so
    no (n, n) temporary is made: ``np.tril`` of a 4096² factor would allocate 128 MiB on
    every solver call.
    """
    n = R.shape[0]
    for i0 in range(1, n, rows):
        i1 = min(n, i0 + rows)
        # rows i0..i1-1, columns 0..i1-2; entry (r, c) is below the diagonal iff c < r
        if np.any(np.tril(R[i0:i1, : i1 - 1], i0 - 1) != 0):
            return True
    return False


def triangular_iv(R, name="R"):
    """Validate an upper-triangular factor: square, finite, non-zero diagonal."""
    R = _real_array(name, R)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"`{name}` must be a square 2-D array, got shape {R.shape}")
    if R.shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one row")
    R = np.ascontiguousarray(R, dtype=np.float64)
    _finite(name, R)
    if _has_lower_entries(R):
        raise ValueError(f"`{name}` must be upper triangular (entries below the diagonal must be 0)")
    if np.any(np.diag(R) == 0):
        raise ValueError(f"`{name}` must have a non-zero diagonal")
    return R


def problem_iv(R, Y, lo, hi, scale=None, offset=None) -> Canonical:
    """Validate ``R, Y, lo, hi, scale, offset`` and return :class:`Canonical` arrays."""
    R = triangular_iv(R)
    n = R.shape[0]
    Y = _real_array("Y", Y)
    if Y.ndim not in (1, 2):
        raise ValueError(f"`Y` must be 1-D (n,) or 2-D (n, k), got {Y.ndim}-D")
    if Y.shape[0] != n:
        raise ValueError(f"`Y` must have `R.shape[0]` = {n} rows, got {Y.shape[0]}")
    squeeze = Y.ndim == 1
    Y = np.ascontiguousarray(Y.reshape(n, -1), dtype=np.float64)
    if Y.shape[1] == 0:
        raise ValueError("`Y` must have at least one column")
    _finite("Y", Y)
    shape = Y.shape

    bounds = []
    for name, b in (("lo", lo), ("hi", hi)):
        b = _real_array(name, b)
        _finite(name, b)
        b = bounds_iv(name, b)  # one safe int64 cast for every dtype (|b| <= 2**52)
        b = _broadcast(name, _as_column_shape(b, squeeze), shape)
        bounds.append(b)
    lo, hi = bounds
    if np.any(lo > hi):
        raise ValueError("`lo` must not exceed `hi` (elementwise)")

    if scale is None:
        scale = np.ones((1, 1))
    scale = _real_array("scale", scale).astype(np.float64, copy=False)
    _finite("scale", scale)
    if np.any(scale == 0):
        raise ValueError("`scale` must be non-zero")
    scale = _broadcast("scale", _as_column_shape(scale, squeeze), shape)

    if offset is None:
        offset = np.zeros((1, 1))
    offset = _real_array("offset", offset).astype(np.float64, copy=False)
    _finite("offset", offset)
    offset = _broadcast("offset", _as_column_shape(offset, squeeze), shape)
    level_weights_iv(R, Y, lo, hi, scale, offset)  # derived quantities: R_ii*s_ij, residual bound
    return Canonical(R, Y, lo, hi, scale, offset, squeeze)


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

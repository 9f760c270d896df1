"""Helpers shared by the built-in methods: array conversion, damping, backend fall-back."""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["as_float64", "damped_hessian", "is_device_array", "is_int", "is_real", "namespace", "round_half_up",
           "to_host", "upper_times", "with_fallback"]

logger = logging.getLogger("llm_adapter.methods")

_warned: set = set()


def is_device_array(a) -> bool:
    """A CuPy array (checked without importing cupy)."""
    return type(a).__module__.startswith("cupy")


def namespace(*arrays):
    """``cupy`` when any of `arrays` is a CuPy array, else ``numpy`` (cupy imported only then)."""
    if any(is_device_array(a) for a in arrays if a is not None):
        import cupy

        return cupy
    return np


def to_host(a):
    """`a` as a numpy array: a CuPy array is copied to the host, anything else ``np.asarray``."""
    if a is None:
        return None
    return a.get() if is_device_array(a) else np.asarray(a)


def as_float64(name, a, ndim=None):
    """`a` (array_like or torch tensor, without importing torch) as a finite float64
    ndarray; ``None`` stays ``None``. With `ndim`, the number of dimensions is checked.
    A CuPy array stays a CuPy array (float64, on its device)."""
    if a is None:
        return None
    if is_device_array(a):
        xp = namespace(a)
        a = xp.asarray(a, dtype=np.float64)
    else:
        if hasattr(a, "detach") and hasattr(a, "cpu"):
            a = a.detach().cpu().double().numpy()
        xp = np
        a = np.asarray(a, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {a.shape}")
    if not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"`{name}` must be finite")
    return a


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
    xp = namespace(H)
    H = xp.array(H, dtype=np.float64, copy=True)
    dead = xp.diag(H) == 0
    di = xp.nonzero(dead)[0]
    H[di, di] = 1.0
    if damp:
        idx = xp.arange(H.shape[0])
        H[idx, idx] += damp * xp.mean(xp.diag(H))
    return H, dead


def upper_times(R, B):
    r"""``R @ B`` for an upper-triangular ``R`` (n, n), reading only its upper triangle.

    Host float64 arrays go through BLAS ``dtrmm`` (half the flops of the dense product;
    ``B`` is copied first, not modified); anything else (CuPy arrays, other dtypes) is the
    dense product ``R @ B``. The two agree to rounding.

    Parameters
    ----------
    R : (n, n) array
        Upper triangular (what is below the diagonal must be zero for the dense fall-back).
    B : (n, k) array

    Returns
    -------
    (n, k) array

    Examples
    --------
    >>> import numpy as np
    >>> R = np.array([[2.0, 1.0], [0.0, 3.0]]); B = np.array([[1.0, 0.0], [1.0, 2.0]])
    >>> upper_times(R, B).tolist()
    [[3.0, 2.0], [3.0, 6.0]]
    """
    if type(R) is not np.ndarray or type(B) is not np.ndarray or R.dtype != np.float64 \
            or B.dtype != np.float64 or B.ndim != 2:
        return R @ B
    from scipy.linalg.blas import dtrmm

    Rc = np.ascontiguousarray(R)
    Bc = np.array(B, order="C", copy=True)
    # (R B)^T = B^T R^T: the C-ordered arrays are their transposes in Fortran order
    out = dtrmm(1.0, Rc.T, Bc.T, side=1, lower=1, trans_a=0, overwrite_b=1)
    return out.T


def with_fallback(fn, backend, what):
    """``(fn(backend), backend)``; with ``backend="auto"``, when the compiled kernel is
    missing (``NotImplementedError`` / ``ImportError``), ``(fn("numpy"), "numpy")`` and one
    warning per `what`."""
    try:
        return fn(backend), backend
    except (NotImplementedError, ImportError) as err:
        if backend != "auto":
            raise
        if what not in _warned:
            _warned.add(what)
            logger.warning("%s: no compiled kernel (%s); using backend='numpy'", what, err)
        return fn("numpy"), "numpy"


def round_half_up(x):
    """The tie rule of :mod:`bils`: ``floor(x + 0.5)``."""
    return np.floor(x + 0.5)


def is_int(v) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

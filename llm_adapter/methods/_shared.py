"""Helpers shared by the built-in methods: array conversion, damping, backend fall-back."""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["as_float64", "damped_hessian", "is_int", "is_real", "round_half_up", "with_fallback"]

logger = logging.getLogger("llm_adapter.methods")

_warned: set = set()


def as_float64(name, a, ndim=None):
    """`a` (array_like or torch tensor, without importing torch) as a finite float64
    ndarray; ``None`` stays ``None``. With `ndim`, the number of dimensions is checked."""
    if a is None:
        return None
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
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
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    if damp:
        H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    return H, dead


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

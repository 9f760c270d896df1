"""A stand-in ``cupy`` for the CPU: numpy underneath, arrays of a type whose module is ``cupy``.

With it in ``sys.modules`` (and the CUDA simulator running the kernels), code that tells
device arrays by their type (``type(a).__module__.startswith("cupy")``) takes its device
branches: ``BILSProblem.from_gram`` and ``bils.joint_target`` on "device" arrays, the
uniform methods' device path, the ``cupy`` backend resolved from the arrays. What it cannot
show: CuPy refuses implicit conversions to numpy (``np.asarray(device_array)``), this
stand-in does not, so a stray host conversion is only caught on a device.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import scipy.linalg


class ndarray(np.ndarray):  # noqa: N801 (CuPy's name)
    """A numpy array whose type says it is CuPy's; ``get()`` copies it to the "host"."""

    def get(self):
        return np.array(self, copy=True).view(np.ndarray)


ndarray.__module__ = "cupy"


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _wrapped(fn):
    def f(*args, **kwargs):
        return _wrap(fn(*args, **kwargs))

    f.__name__ = getattr(fn, "__name__", "f")
    return f


def modules():
    """``{name: module}`` for ``cupy``, ``cupy.linalg``, ``cupyx``, ``cupyx.scipy``,
    ``cupyx.scipy.linalg`` (what the code under test imports)."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray
    cupy.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)

    def getattr_(name):
        obj = getattr(np, name)
        return _wrapped(obj) if callable(obj) and not isinstance(obj, type) else obj

    cupy.__getattr__ = getattr_
    linalg = types.ModuleType("cupy.linalg")
    linalg.cholesky = _wrapped(np.linalg.cholesky)
    linalg.solve = _wrapped(np.linalg.solve)
    linalg.qr = _wrapped(np.linalg.qr)
    cupy.linalg = linalg
    cupyx = types.ModuleType("cupyx")
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx_linalg = types.ModuleType("cupyx.scipy.linalg")
    cupyx_linalg.solve_triangular = _wrapped(scipy.linalg.solve_triangular)
    cupyx.scipy, cupyx_scipy.linalg = cupyx_scipy, cupyx_linalg
    return {"cupy": cupy, "cupy.linalg": linalg, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy,
            "cupyx.scipy.linalg": cupyx_linalg}


def install(monkeypatch):
    """Put the stand-in in ``sys.modules`` for one test (``monkeypatch`` undoes it); returns it."""
    mods = modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods["cupy"]

"""Backend resolution in one place (like ``cupy.get_array_module``).

Backends are imported lazily: importing :mod:`bils` never imports numba or cupy.
"""

from __future__ import annotations

import importlib.util
import os

BACKENDS = ("auto", "numpy", "numba", "cupy")


def _is_cupy_array(a) -> bool:
    mod = type(a).__module__
    return mod.startswith("cupy")


def _is_torch_cuda(a) -> bool:
    return type(a).__module__.startswith("torch") and getattr(getattr(a, "device", None), "type", "") == "cuda"


def cuda_simulator() -> bool:
    """True when numba-cuda's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``).

    Then ``backend="cupy"`` runs the whole GPU code path on numpy arrays (the simulator
    executes the kernels in Python): this is how the GPU path is tested without a GPU.
    """
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")


def array_namespace(*arrays):
    """``cupy`` when any input is a CuPy array or a CUDA torch tensor, else ``numpy``.

    Imports cupy only in the first case (importing :mod:`bils` never imports it).
    """
    if any(_is_cupy_array(a) or _is_torch_cuda(a) for a in arrays if a is not None):
        import cupy

        return cupy
    import numpy

    return numpy
def _chunk_meta(a):
    """A dask array stands for its chunks: resolve from its ``_meta`` (numpy, cupy, ...)."""
    if type(a).__module__.startswith("dask.array"):
        return getattr(a, "_meta", None)
    return a


def numba_available() -> bool:
    """True when numba can be imported (without importing it)."""
    if os.environ.get("BILS_DISABLE_NUMBA", "") not in ("", "0"):
        return False
    return importlib.util.find_spec("numba") is not None


def resolve_backend(backend, *arrays) -> str:
    """Turn ``backend`` (``"auto"``, ``"numpy"``, ``"numba"``, ``"cupy"``) into a concrete name.

    ``auto`` picks ``cupy`` when any input lives on a GPU (a CuPy array or a CUDA torch
    tensor; never for numpy arrays, even under the CUDA simulator), else ``numba`` when
    importable, else ``numpy``. Asking for a backend that
    is not installed raises :class:`ImportError` naming the extra to install.

    Parameters
    ----------
    backend : {"auto", "numpy", "numba", "cupy"}
        The requested backend.
    *arrays : array_like or None
        The inputs of the call (``None`` entries are ignored). With ``"auto"`` they
        decide whether the GPU is used; with ``"numpy"`` or ``"numba"`` none of them may
        live on a GPU. A ``dask.array`` counts as its chunk type (its ``_meta``): numpy
        chunks resolve like numpy arrays, CuPy chunks like CuPy arrays.

    Returns
    -------
    str
        ``"numpy"``, ``"numba"`` or ``"cupy"``.

    Raises
    ------
    ValueError
        If `backend` is not one of the names above, or an input lives on a GPU and
        `backend` is not ``"cupy"`` or ``"auto"``.
    ImportError
        If the requested backend's package is not installed.

    Examples
    --------
    >>> import numpy as np, bils
    >>> bils.resolve_backend("numpy", np.zeros(3))
    'numpy'
    >>> bils.resolve_backend("auto", np.zeros(3)) in ("numba", "numpy")  # CPU inputs
    True
    >>> bils.resolve_backend("fortran")
    Traceback (most recent call last):
        ...
    ValueError: `backend` must be one of ('auto', 'numpy', 'numba', 'cupy'), got 'fortran'
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    arrays = [_chunk_meta(a) for a in arrays]
    on_gpu = any(_is_cupy_array(a) or _is_torch_cuda(a) for a in arrays if a is not None)
    if backend == "auto":
        if on_gpu:
            return "cupy"
        return "numba" if numba_available() else "numpy"
    if backend == "numba" and importlib.util.find_spec("numba") is None:
        raise ImportError("backend='numba' needs numba: pip install 'bils[numba]'")
    if backend == "cupy":
        if cuda_simulator():  # the simulator runs the GPU path on numpy arrays
            if importlib.util.find_spec("numba") is None:
                raise ImportError("backend='cupy' under NUMBA_ENABLE_CUDASIM needs numba-cuda: "
                                  "pip install 'bils[cuda-sim]'")
        elif importlib.util.find_spec("cupy") is None or importlib.util.find_spec("numba") is None:
            raise ImportError("backend='cupy' needs CuPy and numba-cuda: pip install 'bils[gpu]'")
    if on_gpu and backend != "cupy":
        raise ValueError(f"inputs live on a GPU but `backend`={backend!r}; use 'cupy' or 'auto'")
    return backend

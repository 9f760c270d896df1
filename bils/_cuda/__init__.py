"""numba-cuda kernels of the ``cupy`` backend (private).

One module per solver, each exposing ``<solver>_kernel(can, **options)`` with the same
signature and semantics as the numba CPU kernels of :mod:`bils._numba` (and the numpy
reference kernel in the public solver module): ``can`` is a
:class:`~bils._validate.Canonical` (numpy or CuPy arrays), the result is
``(x, cost, status, info)`` with arrays of the device namespace (CuPy; numpy under the
CUDA simulator). Same tie rule (``floor(c + 0.5)``), orderings and status codes.

Conventions:

* CuPy owns the device arrays and runs the products (``xp.matmul``, cuBLAS); the
  sequential parts are ``@cuda.jit`` kernels launched directly on CuPy arrays (CUDA array
  interface). Kernels are built lazily by factories (one per working dtype) so importing
  :mod:`bils` never imports numba or cupy.
* Launch sizes live in one place, :data:`bils._cuda._common.LAUNCH`; tests shrink them to
  cross block and tile edges on small problems.
* No warp shuffles (the simulator has none); no ``fastmath`` (rounding decisions are the
  algorithm).
* With ``NUMBA_ENABLE_CUDASIM=1`` the array module is numpy and the simulator runs every
  kernel in Python: the whole ``backend="cupy"`` path runs without a GPU.
"""

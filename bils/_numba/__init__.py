"""Numba CPU kernels (private).

One module per solver, each exposing ``<solver>_kernel(can, **options)`` with the same
signature and semantics as the numpy reference kernel in the public solver module;
:mod:`~bils._numba.passes` holds the driver's fused whole-array passes (validation
reductions, output check, result reordering), used for large arrays when numba is
importable.
Kernels are compiled lazily with ``cache=True`` (so later processes load them from the
on-disk cache), never use ``fastmath`` (rounding decisions are the algorithm), parallelise
with ``prange`` over right-hand sides only (no shared mutable state, so results do not
depend on the thread count), and still run under ``NUMBA_DISABLE_JIT=1``.
"""

"""Numba CPU kernels (private).

One module per solver, each exposing ``<solver>_kernel(can, **options)`` with the same
signature and semantics as the numpy reference kernel in the public solver module.
Kernels are compiled lazily with ``cache=True`` (so later processes load them from the
on-disk cache), never use ``fastmath`` (rounding decisions are the algorithm), parallelise
with ``prange`` over right-hand sides only (no shared mutable state, so results do not
depend on the thread count), and still run under ``NUMBA_DISABLE_JIT=1``.
"""

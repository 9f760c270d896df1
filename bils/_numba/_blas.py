"""BLAS products beside numba kernels, without OpenBLAS's spinning worker pool.

A multi-threaded OpenBLAS call leaves its workers spinning (about 2^28 cycles) before
they sleep, on the cores where the next numba kernel runs. Kernels that alternate BLAS
products with numba sweeps (K-best's panels) run their products through
:class:`Products`: OpenBLAS held at one thread, products split into fixed column blocks
over Python threads.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["PRODUCT_COLS", "Products", "openblas_thread_apis"]

#: Columns per block of the panels' products (:class:`Products`): fixed, so that the
#: products' rounding does not depend on the thread count.
PRODUCT_COLS = 256


@functools.lru_cache(maxsize=1)
def openblas_thread_apis():
    """``(get, set)`` thread-count functions of every OpenBLAS loaded in this process.

    Found through ``/proc/self/maps`` (numpy's wheel bundles ``libscipy_openblas64_``;
    a system numpy links ``libopenblas``); empty where there is none or no ``/proc``.
    """
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        return ()
    names = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
             ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
             ("openblas_get_num_threads", "openblas_set_num_threads"))
    apis = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for gname, sname in names:
            get, set_ = getattr(lib, gname, None), getattr(lib, sname, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                apis.append((get, set_))
                break
    return tuple(apis)


class Products:
    """The panels' BLAS products without OpenBLAS's worker pool.

    After a multi-threaded OpenBLAS call its workers spin (about 2^28 cycles) before they
    sleep, on the cores where the next panel's numba threads run: on 2 cores that cost
    K-best ~25 % more CPU time (4096 x 2048, 3-bit, K = 8: 5.1-5.6 against 4.0-4.4 CPU s
    with OpenBLAS held at one thread). Inside the ``with`` block OpenBLAS runs in its
    callers' threads (its thread count is restored on exit), and a product is computed in
    blocks of ``cols`` columns (default :data:`PRODUCT_COLS`) spread over ``threads``
    Python threads (numpy
    releases the GIL): a parallel product, with no spinning pool after it. The blocks do
    not depend on the thread count, so neither do the results (OpenBLAS's single-threaded
    kernels for small shapes round differently from its threaded ones: within 1e-13 here).
    """

    def __init__(self, threads, cols=PRODUCT_COLS):
        self.threads = max(1, int(threads))
        self.cols = int(cols)
        self.apis = openblas_thread_apis()
        self.pool = None

    #: Calls inside a ``with`` block now (any thread) and OpenBLAS's thread counts before
    #: the first of them: the last one out restores them (concurrent calls, e.g. from
    #: dask's threads, must not restore each other's 1).
    _lock = threading.Lock()
    _active = 0
    _saved = []

    def __enter__(self):
        with Products._lock:
            if Products._active == 0:
                Products._saved = [(set_, get()) for get, set_ in self.apis]
                for set_, _ in Products._saved:
                    set_(1)
            Products._active += 1
        if self.apis and self.threads > 1:  # (no OpenBLAS found: its own threads, if any)
            self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="bils-blas")
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        with Products._lock:
            Products._active -= 1
            if Products._active == 0:
                for set_, n in Products._saved:
                    set_(n)
                Products._saved = []

    def matmul(self, A, B, out):
        """``out[:] = A @ B`` in column blocks of ``cols`` (:data:`PRODUCT_COLS`), over the threads."""
        w = B.shape[1]
        cuts = list(range(0, w, self.cols)) + [w]
        blocks = list(zip(cuts[:-1], cuts[1:]))
        if self.pool is None or len(blocks) == 1:
            for c0, c1 in blocks:
                np.matmul(A, B[:, c0:c1], out=out[:, c0:c1])
            return
        nt = min(self.threads, len(blocks))

        def part(t):  # thread t: blocks t, t + nt, ...
            for c0, c1 in blocks[t::nt]:
                np.matmul(A, B[:, c0:c1], out=out[:, c0:c1])

        futs = [self.pool.submit(part, t) for t in range(1, nt)]
        part(0)
        for f in futs:
            f.result()

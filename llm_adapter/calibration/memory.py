"""Giving freed host memory back between the stages of the single pass (glibc only).

The single pass (:func:`~llm_adapter.calibration.quantize_model`, ``single_pass=True``)
runs every calibration batch in a thread of its own. glibc's ``malloc`` gives each thread
an arena of its own, and memory a thread frees stays in its arena, where the other threads
cannot reuse it: the resident memory grows well past what is alive (SmolLM2, 3 blocks,
32 x 512 tokens, 4 batch threads: 1.32 GiB over the start; 0.58 GiB with the arenas capped
at 2, 0.64 GiB with :func:`trim`; docs/performance.md). Two remedies:

* :func:`limit_arenas` (process-wide, for applications: the ``llm-adapter`` program and the
  benchmarks call it; the library does not), the better one: less memory, fewer page
  faults, less CPU time;
* :func:`trim`, which the driver calls while all the batch threads wait at a group: glibc
  hands every arena's free pages back to the system (``malloc_trim(0)``); it changes no
  setting, costs page faults, and does nothing where the arenas are capped.

On other C libraries both do nothing.

What is left with capped arenas is fragmentation: glibc raises its threshold for serving a
large block by ``mmap`` each time such a block is freed (up to 32 MiB), so after the first
blocks the batches' activations (SmolLM2 at 8 x 512 tokens: 9 to 25 MB each) come from the
heap, where freed pieces of different sizes do not fit the next ones and stay resident.
:func:`fix_mmap_threshold` (also for applications) fixes the threshold: every block of at
least 4 MiB is its own mapping, given back to the system when freed, and the resident memory
follows what is alive (SmolLM2, 3 blocks, 64 x 512 tokens: 0.80 GiB over the start instead
of 1.55 GiB, the same minor page faults; docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

__all__ = ["fix_mmap_threshold", "limit_arenas", "trim"]

logger = logging.getLogger("llm_adapter.calibration")

_CAPPED = []  # [n] once limit_arenas(n) took effect: mirrors the process's malloc setting


@functools.lru_cache(maxsize=None)
def _libc_function(name: str, argtypes: tuple, restype):
    """The C library's function `name` with its signature set, or None (looked up once)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        logger.debug("no %s in the C library", name, exc_info=True)
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``: whether it took it (False on other C libraries)."""
    fn = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    return fn is not None and bool(fn(param, value))


def trim() -> bool:
    """Return the free pages of every malloc arena to the system (glibc ``malloc_trim(0)``).

    Nothing is done where the arenas are capped (:func:`limit_arenas` called, or
    ``MALLOC_ARENA_MAX`` in the environment): the threads then share their freed memory
    already, and trimming only costs page faults (docs/performance.md: 0.58 GiB without,
    0.52 GiB with, but 2.3 times the page faults and more CPU time).

    Returns
    -------
    bool
        Whether glibc's ``malloc_trim`` was called (False on other C libraries or with
        capped arenas: a no-op).

    Examples
    --------
    >>> trim() in (True, False)
    True
    """
    fn = _libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if fn is None or _CAPPED or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    fn(0)
    return True


def limit_arenas(n: int = 2) -> bool:
    """Cap glibc's number of malloc arenas at `n` for the rest of the process (``mallopt``).

    Process-wide, like the ``MALLOC_ARENA_MAX`` environment variable it stands for, so the
    library never calls it: applications do (``python -m llm_adapter`` and the benchmarks),
    before the calibration starts its threads. With ``n = 2`` the single pass's batch threads
    share two arenas, and what one frees the others reuse (docs/performance.md: SmolLM2,
    3 blocks, 32 x 512 tokens, 0.58 GiB over the start instead of 1.32 GiB, fewer page
    faults and less CPU time).

    Parameters
    ----------
    n : int
        Arenas (>= 1).

    Returns
    -------
    bool
        Whether glibc's ``mallopt`` took it (False on other C libraries: nothing done).

    Examples
    --------
    >>> from llm_adapter.calibration.memory import limit_arenas
    >>> limit_arenas(2)  # doctest: +SKIP
    True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}")
    M_ARENA_MAX = -8  # glibc's malloc.h
    ok = _mallopt(M_ARENA_MAX, n)
    if ok and not _CAPPED:
        _CAPPED.append(n)
    return ok


#: The default of :func:`fix_mmap_threshold`: above the tensors of a few thousand tokens of a
#: small model's hidden states, below the activations of a calibration batch.
MMAP_THRESHOLD = 4 * 2 ** 20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of at least `nbytes` by its own ``mmap``, for the rest of the process.

    glibc's ``mallopt(M_MMAP_THRESHOLD, nbytes)``, like the ``MALLOC_MMAP_THRESHOLD_``
    environment variable it stands for: it also turns off glibc's dynamic threshold (raised
    to the size of every mapped block freed, up to 32 MiB), so large blocks never come from
    the heap, where freed ones fragment it and stay resident. Process-wide, so the library
    never calls it: applications do (``python -m llm_adapter`` and the benchmarks), before
    the calibration starts. The single pass's peak memory then follows what is alive (the
    batches' activations at a group's input), at about the same page faults (each block of
    a calibration batch is fresh memory either way).

    Parameters
    ----------
    nbytes : int
        Threshold in bytes, in ``[4096, 32 MiB]`` (glibc's ``HEAP_MAX / 2`` on 64-bit).

    Returns
    -------
    bool
        Whether glibc's ``mallopt`` took it (False on other C libraries: nothing done).

    Examples
    --------
    >>> from llm_adapter.calibration.memory import fix_mmap_threshold
    >>> fix_mmap_threshold(4 * 2**20)  # doctest: +SKIP
    True
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 4096 <= nbytes <= 32 * 2 ** 20:
        raise ValueError(f"`nbytes` must be an int in [4096, {32 * 2 ** 20}], got {nbytes!r}")
    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    return _mallopt(M_MMAP_THRESHOLD, nbytes)

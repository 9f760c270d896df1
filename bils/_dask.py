"""Solves whose right-hand sides are a ``dask.array``: one task per RHS chunk.

Every solver's :func:`bils._driver.run_solver` hands over to :func:`run_solver_dask` when
``Y`` (or a grid array, or the targets of a :class:`~bils.BILSProblem`) is a dask array.
The graph holds

* ``R`` (the shared factor, in memory) inside every chunk task when it is small
  (``R.nbytes`` times the number of chunks at most :data:`INLINE_R_BYTES`, 1 MiB: n = 32
  up to 128 chunks), so that no solve waits for an ``R`` task or an ``R`` transfer; a
  larger ``R`` is one key every chunk task depends on, so a distributed scheduler ships it
  once per worker, not once per chunk (:func:`inline_R`);
* one solve task per column chunk of ``Y`` (rechunked to a single chunk along ``n``),
  which runs the ordinary in-memory :func:`~bils._driver.run_solver` on numpy blocks (a
  chunk wider than :data:`SOLVE_SLICE_ELEMENTS` ``// n`` columns in column slices, one
  call each, so that a task's temporaries stay in glibc's heap whatever the chunk size): one
  blockwise layer (``Y``'s and the grids' single row block is a contracted index, numpy
  per-RHS slices and the chunks' first columns are ``BlockwiseDepDict`` arguments), so
  dask's blockwise fusion can merge it with the one consumer of an output computed alone;
* small ``getitem`` tasks turning each solve's tuple into blocks of ``x``, ``cost``,
  ``status`` (and the per-RHS entries of ``info``): one blockwise layer per output on top
  of the one layer of solves, so ``dask.compute(res.x, res.cost)`` runs each solve once,
  and a getter is fused with the blockwise step that follows it (``res.cost.sum()``: one
  task per chunk for the getter and the chunk's partial sum, no alias tasks).

The result keeps the solves (:class:`LazyChunks`), so that its own operations run one
task per chunk: ``compute()`` gathers the per-chunk tuples and joins them in the caller's
process (no getter or concatenation task on the cluster), ``persist()`` keeps one tuple
per chunk (the fields become getters of the kept tuples), and ``reduce_chunks(chunk,
aggregate)`` runs ``chunk`` inside each chunk's solve task and one aggregation task. A
task costs the cluster a few milliseconds of CPU (the worker's event loop, the
scheduler): for a 10⁶-RHS Babai solve in 20 chunks that is as much as a third of the
solve's own time with four tasks per chunk.

Results are compact: ``x`` comes in the smallest signed integer type holding the box
(``int8`` for a box inside [-128, 127], then ``int16``, ``int32``; ``int64`` when ``lo``
or ``hi`` is itself a dask array), ``status`` as ``int8``, ``cost`` as ``float64``. The
codes are the in-memory solve's, value for value; a (32, 10⁶) box-[0, 15] result is 32
MB to gather, not 256 MB. Arithmetic that can leave the box's range (``x ** 2``,
``x * 1000``) needs ``x.astype(np.int64)`` first, as with any small integer type.

Results do not depend on the chunking: every solver is column-separable, and Klein's
per-RHS seeds are drawn once on the caller's side for all ``k`` columns (exactly as the
in-memory call draws them) and each chunk receives the slice of its global columns.

Nothing here imports dask at :mod:`bils` import time; this module is imported only when
a dask array has been seen (:func:`is_dask_array` looks at the type's module name).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import sys
import time
import uuid

import numpy as np

from ._grid import GroupedGrid

__all__ = ["is_dask_array", "uses_dask", "run_solver_dask", "code_dtype", "worker_numba_threads"]

#: Per-RHS entries of ``info`` (shape (k,) or (m, k)) returned lazily, by solver.
_RHS_INFO = {
    "klein": {"tau": np.float64, "improved": np.bool_},
    "enumerate": {"nodes": np.int64},
}


def is_dask_array(a) -> bool:
    """True for a ``dask.array.Array`` (checked by type module: dask is not imported)."""
    return type(a).__module__.startswith("dask.array")


def uses_dask(R, Y, lo, hi, scale, offset) -> bool:
    """Whether a solver call must build a dask graph."""
    from .problem import BILSProblem

    if isinstance(R, BILSProblem):
        return any(is_dask_array(a) for a in (R.Y, R.lo, R.hi, R.scale, R.offset, R.cost_offset))
    return any(is_dask_array(a) for a in (R, Y, lo, hi, scale, offset))


# ---------------------------------------------------------------------- shape helpers
def _grid_2d(name, a, n, k, squeeze, default):
    """``a`` (numpy or dask) as a 2-D array of shape (1 or n, 1 or k), numpy broadcasting."""
    if a is None:
        return np.full((1, 1), default)
    if not is_dask_array(a):
        a = np.asarray(a)
    if squeeze and a.ndim == 1:
        a = a[:, None]
    if a.ndim > 2:
        raise ValueError(f"`{name}` must be broadcastable to `Y.shape` {(n, k)}, got shape {a.shape}")
    a = a.reshape((1,) * (2 - a.ndim) + tuple(a.shape))
    if a.shape[0] not in (1, n) or a.shape[1] not in (1, k):
        raise ValueError(f"`{name}` must be broadcastable to `Y.shape` {(n, k)}, got shape {a.shape}")
    return a


def _check_grouped(name, a, n, k):
    """A :class:`~bils.GroupedGrid` argument: a form of ``scale``/``offset`` only, of a
    shape broadcastable to ``Y``'s (n, k)."""
    if name in ("lo", "hi"):
        raise TypeError(f"`{name}` must be a number or an array; a GroupedGrid is a form of "
                        f"`scale` and `offset` only")
    if a.shape[0] != n or a.values.shape[1] not in (1, k):
        raise ValueError(f"`{name}` (a GroupedGrid of shape {a.shape}) must be broadcastable "
                         f"to `Y.shape` {(n, k)}")


def _check_dtype(name, a):
    kind = np.dtype(a.dtype).kind
    if kind not in ("f", "i", "u"):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {a.dtype}")


class _Blocks:
    """The per-column-chunk pieces of one argument: a (1 or n, 1 or k) grid or a (k,) vector.

    Per-RHS data (last axis of length ``k``) is cut like ``Y``'s columns: numpy slices are
    embedded in their chunk's task, dask arrays are rechunked to ``Y``'s column chunks and
    referenced by key. Shared data (last axis 1) goes whole into every task (it is small:
    at most ``n`` numbers).
    """

    def __init__(self, a, col_chunks, deps):
        k = sum(col_chunks)
        self.per_rhs = a.shape[-1] == k and (k > 1 or is_dask_array(a))
        if is_dask_array(a):
            lead = tuple((s,) for s in a.shape[:-1])
            a = a.rechunk(lead + ((tuple(col_chunks),) if self.per_rhs else ((a.shape[-1],),)))
            deps.append(a)
        self.a = a
        self.offsets = np.concatenate([[0], np.cumsum(col_chunks)]).astype(int)

    def block(self, j):
        a = self.a
        if is_dask_array(a):
            return (a.name,) + (0,) * (a.ndim - 1) + ((j,) if self.per_rhs else (0,))
        if not self.per_rhs:
            return a
        return a[..., self.offsets[j]:self.offsets[j + 1]]

    def pair(self, nb):
        """This argument as an ``(argument, index)`` pair of a blockwise layer over the
        column chunks (index ``j``; a 2-D dask array's single row block is the contracted
        index ``i``: the task gets a list of one block)."""
        from dask._task_spec import TaskRef
        from dask.blockwise import BlockwiseDepDict

        a = self.a
        if is_dask_array(a):
            if self.per_rhs:
                return a.name, "ij"[2 - a.ndim:]
            return TaskRef((a.name,) + (0,) * a.ndim), None
        if not self.per_rhs:
            return a, None
        return BlockwiseDepDict({(j,): self.block(j) for j in range(nb)}), "j"

    def numblocks(self):
        return {self.a.name: self.a.numblocks} if is_dask_array(self.a) and self.per_rhs else {}


# ---------------------------------------------------------------------- chunk task
class _ChunkOptions:
    """A callable-options object seen from one chunk: local columns -> global columns."""

    def __init__(self, options, j0, k_total, rhs):
        self.options, self.j0, self.k_total, self.rhs = options, j0, k_total, rhs

    def __call__(self, can, cols, k_total):
        glob = slice(self.j0 + cols.start, self.j0 + cols.stop)
        extra = {name: arr[cols] for name, arr in self.rhs.items()}
        return self.options(can, glob, self.k_total, **extra)


def worker_numba_threads():
    """The numba thread count of a solve running inside a ``distributed`` worker, or None.

    A worker process gets ``OMP_NUM_THREADS`` (1 by default: distributed's nanny sets it,
    and ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, so that ``threads_per_worker``
    worker threads do not each start a pool of every core) but not ``NUMBA_NUM_THREADS``:
    numba's ``prange`` would use every core in every worker thread — on a 2-core machine
    with 2 single-threaded workers, 4 threads on 2 cores. Inside a worker, a numba solve
    therefore uses ``OMP_NUM_THREADS`` threads (1 when unset), at most numba's own count.
    None (numba's setting applies) outside a worker, and when ``NUMBA_NUM_THREADS`` is set
    in the worker's environment: set it to give a single-threaded worker on 8 cores 8
    numba threads.
    """
    if "distributed" not in sys.modules or "NUMBA_NUM_THREADS" in os.environ:
        return None
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):  # not in a worker's task
        return None
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def _numba_threads(backend):
    """Within: numba's thread count of this thread set to :func:`worker_numba_threads`
    for a numba solve in a ``distributed`` worker (restored after); else nothing changes."""
    threads = worker_numba_threads() if backend == "numba" else None
    if threads is None:
        yield
        return
    import numba

    before = numba.get_num_threads()  # numba's thread count is per calling thread
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


#: A chunk task solves its numpy chunk in column slices of at most this many elements
#: (``n`` times the slice's columns): 32 MB of an (n, columns) float64 or int64 array,
#: under glibc's largest mmap threshold (32 MiB). With the threshold raised (see
#: docs/scaling_out.md, ``MALLOC_MMAP_THRESHOLD_``) the solve's own (n, columns) arrays —
#: the int64 codes, a contiguous float64 copy of a slice — then come from the heap and are
#: reused from slice to slice, where an array above the threshold is a fresh mapping that
#: the OS zeroes page by page on every solve (a (32, 500 000) chunk: 128 MB of codes).
#: n = 32: slices of 125 000 columns; a chunk of up to that many is solved in one call.
SOLVE_SLICE_ELEMENTS = 4_000_000


def _solve_block(R, Y, lo, hi, scale, offset, cost_offset, *rhs, solver, kernels, backend,
                 options, rhs_names, j0, k_total, perm, dead, info_keys, code_dtype, grouped=None):
    """Solve one column chunk in memory; returns (x, cost, status, per-RHS info).

    A numpy chunk wider than :data:`SOLVE_SLICE_ELEMENTS` ``// n`` columns is solved in
    column slices of that width, one after another, and the slices' results are joined:
    every solver is column-separable and each slice gets its global columns (``j0``), so
    the result is the one-call result (the same codes, statuses and, with numba, costs).
    """
    kw = dict(solver=solver, kernels=kernels, backend=backend, options=options, rhs_names=rhs_names,
              k_total=k_total, perm=perm, dead=dead, info_keys=info_keys, code_dtype=code_dtype,
              grouped=grouped)
    with _numba_threads(backend):
        kc = np.shape(Y)[-1] if np.ndim(Y) == 2 else 1
        step = max(1, SOLVE_SLICE_ELEMENTS // max(1, np.shape(Y)[0]))
        if kc <= step or type(Y) is not np.ndarray:  # device chunks: the array module's pool
            return _solve_block_here(R, Y, lo, hi, scale, offset, cost_offset, *rhs, j0=j0, **kw)
        parts = []
        for a in range(0, kc, step):
            def cut(v, a=a):  # per-RHS values (last axis of the chunk's width): this slice's columns
                return v[..., a:a + step] if v is not None and np.ndim(v) >= 1 and np.shape(v)[-1] == kc else v

            parts.append(_solve_block_here(R, Y[:, a:a + step], *(cut(g) for g in (lo, hi, scale, offset)),
                                           cut(cost_offset), *(cut(v) for v in rhs), j0=j0 + a, **kw))
        join = functools.partial(np.concatenate, axis=-1)
        return (join([p[0] for p in parts]), join([p[1] for p in parts]), join([p[2] for p in parts]),
                {key: join([p[3][key] for p in parts]) for key in parts[0][3]})


def _solve_block_here(R, Y, lo, hi, scale, offset, cost_offset, *rhs, solver, kernels, backend,
                      options, rhs_names, j0, k_total, perm, dead, info_keys, code_dtype,
                      grouped=None):
    from ._driver import run_solver
    from .problem import BILSProblem

    grids = [lo, hi, scale, offset]
    for i, groups in (grouped or {}).items():  # this chunk's columns of a GroupedGrid's values
        grids[i] = GroupedGrid(grids[i], groups)
    lo, hi, scale, offset = grids
    if callable(options):
        options = _ChunkOptions(options, j0, k_total, dict(zip(rhs_names, rhs)))
    Y = np.asarray(Y)
    if cost_offset is not None:  # a BILSProblem chunk: keeps its ordering and constant cost
        prob = BILSProblem(R, Y, *(g if isinstance(g, GroupedGrid) else np.asarray(g)
                                   for g in (lo, hi, scale, offset)), perm,
                           np.asarray(cost_offset, dtype=np.float64), dead, False)
        res = run_solver(solver, kernels, prob, None, None, None, None, None, backend, options)
    else:
        res = run_solver(solver, kernels, R, Y, lo, hi, scale, offset, backend, options)
    info = {key: np.asarray(res.info[key]) for key in info_keys if key in res.info}
    # codes lie in the box (the driver's output check): the cast keeps every value
    return res.x.astype(code_dtype, copy=False), res.cost, res.status, info


def _solve_chunk(func, j0, *args):
    """A blockwise solve task: ``func(*args, j0=j0)``, the contracted single-block inputs
    (a list of one block) unwrapped."""
    return func(*(a[0] if type(a) is list else a for a in args), j0=j0)


def _info_get(out, key):
    return out[3][key]


def code_dtype(lo, hi):
    """The smallest signed integer dtype holding every integer of ``[min lo, max hi]``.

    ``lo``, ``hi``: the bounds as given (scalars or arrays; values are validated per chunk
    later). A dask bound, or bounds that are not finite numbers, give ``int64``.
    """
    if is_dask_array(lo) or is_dask_array(hi):
        return np.dtype(np.int64)
    with np.errstate(invalid="ignore"):
        lo_min, hi_max = float(np.min(lo)), float(np.max(hi))
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo_min and hi_max <= info.max:  # False for NaN
            return np.dtype(dt)
    return np.dtype(np.int64)


# ---------------------------------------------------------------------- driver
#: ``R`` goes inside every chunk's task while ``R.nbytes * chunks`` is at most this many
#: bytes (n = 32: 8 KiB, up to 128 chunks); above it, ``R`` is one graph key.
INLINE_R_BYTES = 1 << 20


def inline_R(R, n_chunks) -> bool:
    """Whether ``R`` travels inside each of the ``n_chunks`` solve tasks instead of as one key.

    A key costs every solve a dependency: on a ``distributed`` cluster the scheduler first
    runs the key's task on one worker, hears back, then releases the solves, and every
    other worker fetches ``R`` from the first before its first solve — two message round
    trips (about 10 ms on loopback) before any work, and the key's task and transfers in
    the task stream. A small ``R`` embedded in every task costs a few kilobytes per task
    instead. A large ``R`` (``R.nbytes * n_chunks`` above :data:`INLINE_R_BYTES`) stays one
    key, so that it is sent once per worker, not once per chunk.
    """
    return R.nbytes * n_chunks <= INLINE_R_BYTES


def run_solver_dask(solver, kernels, R, Y, lo, hi, scale, offset, backend, options):
    """Build the lazy result of ``solver`` for dask right-hand sides (see module docstring)."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    from ._backend import resolve_backend
    from ._validate import triangular_iv
    from .problem import BILSProblem
    from .result import BILSResult

    t0 = time.perf_counter()
    if isinstance(R, BILSProblem):
        problem = R
        if any(a is not None for a in (Y, lo, hi, scale, offset)):
            raise TypeError("when the first argument is a BILSProblem, `Y`, `lo`, `hi`, `scale` "
                            "and `offset` must not be given (they come from the problem)")
        if problem.perm is not None and np.ndim(problem.perm) == 2:
            raise NotImplementedError("per-RHS orderings ('chang_han') are not supported with dask "
                                      "right-hand sides; use a shared ordering")
        Rm, Y, lo, hi, scale, offset = (problem.R, problem.Y, problem.lo, problem.hi,
                                       problem.scale, problem.offset)
        squeeze, perm, dead = problem.squeeze, problem.perm, problem.dead
        cost_offset = problem.cost_offset
    else:
        if is_dask_array(R):
            raise TypeError("`R` must be an in-memory array (it is sent once to every worker), "
                            "not a dask array; call `R.compute()` first")
        if Y is None or lo is None or hi is None:
            raise TypeError("`R`, `Y`, `lo` and `hi` are required (or pass a BILSProblem)")
        problem, Rm, perm, dead, cost_offset = None, R, None, None, None
    Rm = triangular_iv(Rm)
    n = Rm.shape[0]
    if not is_dask_array(Y):
        Y = np.asarray(Y)
    _check_dtype("Y", Y)
    if Y.ndim not in (1, 2):
        raise ValueError(f"`Y` must be 1-D (n,) or 2-D (n, k), got {Y.ndim}-D")
    if Y.shape[0] != n:
        raise ValueError(f"`Y` must have `R.shape[0]` = {n} rows, got {Y.shape[0]}")
    if problem is None:
        squeeze = Y.ndim == 1
    if Y.ndim == 1:
        Y = Y[:, None]
    k = Y.shape[1]
    if k == 0 or any(np.isnan(c) for c in Y.shape):
        raise ValueError("`Y` must have at least one column (and known chunk sizes)")

    grids = []
    grouped = {}  # index in grids -> group map of a GroupedGrid (its values go in ``grids``)
    for i, (name, a, default) in enumerate((("lo", lo, 0), ("hi", hi, 0), ("scale", scale, 1.0),
                                            ("offset", offset, 0.0))):
        if isinstance(a, GroupedGrid):
            _check_grouped(name, a, n, k)
            # the (groups, 1 or k) values travel like a grid, cut by the chunks' columns;
            # each task rebuilds its chunk's GroupedGrid (never an (n, k) array)
            grouped[i], a = a.groups, a.values
        g = _grid_2d(name, a, a.shape[0] if i in grouped else n, k, squeeze, default)
        _check_dtype(name, g)
        grids.append(g)
    # the column chunking comes from Y, or from the first dask grid when Y is in memory
    if is_dask_array(Y):
        Y = Y.rechunk({0: -1})
    else:
        ref = next((g for g in grids if is_dask_array(g) and g.shape[1] == k), None)
        Y = da.from_array(Y, chunks=(n, ref.chunks[1] if ref is not None else k))
    col_chunks = Y.chunks[1]
    nb = len(col_chunks)
    starts = np.concatenate([[0], np.cumsum(col_chunks)]).astype(int)

    be = resolve_backend(backend, Rm, Y)
    co = None  # a problem's constant cost part, (k,)
    if problem is not None:
        co = cost_offset if is_dask_array(cost_offset) else \
            np.broadcast_to(np.asarray(cost_offset, dtype=np.float64), (k,))
    rhs = {}
    if callable(options) and hasattr(options, "rhs_arrays"):
        rhs = options.rhs_arrays(k)  # drawn here, once, for the global columns (Klein's seeds)

    deps = [Y]
    pieces = [_Blocks(g, col_chunks, deps) for g in grids]
    co_piece = None if co is None else _Blocks(co, col_chunks, deps)
    rhs_pieces = [_Blocks(np.asarray(v), col_chunks, deps) for v in rhs.values()]
    info_keys = tuple(_RHS_INFO.get(solver, {}))
    n_best = options.get("n_best", 1) if isinstance(options, dict) else 1
    if n_best > 1:
        info_keys += ("best_x", "best_cost")

    token = tokenize(solver, Rm, Y.name, [g if not is_dask_array(g) else g.name for g in grids],
                     None if co is None else (co if not is_dask_array(co) else co.name), be,
                     options if isinstance(options, dict) else uuid.uuid4().hex,
                     [np.asarray(v) for v in rhs.values()], sorted(grouped.items()))
    # a small R goes into every chunk's task (no R task to run before the solves, no R
    # transfer between workers); a large one is one graph key shared by every chunk task
    r_key = None if inline_R(Rm, nb) else f"bils-R-{tokenize(Rm)}"
    r_arg = Rm if r_key is None else r_key
    name = f"bils-{solver}-{token}"
    xdt = code_dtype(grids[0], grids[1])
    func = functools.partial(_solve_block, solver=solver, kernels=kernels, backend=be,
                             options=options, rhs_names=tuple(rhs), k_total=k, perm=perm,
                             dead=dead, info_keys=info_keys, code_dtype=xdt, grouped=grouped)
    recipe = {}  # each chunk's solve as one task tuple: reduce_chunks composes with it
    for j in range(nb):
        args = [r_arg, (Y.name, 0, j)] + [p.block(j) for p in pieces]
        args.append(None if co_piece is None else co_piece.block(j))
        args += [p.block(j) for p in rhs_pieces]
        recipe[j] = (functools.partial(func, j0=int(starts[j])),) + tuple(args)
    # one blockwise layer of solves, seen as a 1-D array of per-chunk result tuples, R one
    # key beside it; each output is a blockwise getter on top of it, so that dask fuses a
    # getter with the blockwise work that follows (a reduction's first step) into one task
    # per chunk, and with the solve too when that output is the only one computed
    from dask._task_spec import TaskRef
    from dask.blockwise import BlockwiseDepDict
    from dask.blockwise import blockwise as core_blockwise
    from dask.delayed import Delayed

    pairs = [BlockwiseDepDict({(j,): int(starts[j]) for j in range(nb)}), "j",
             Rm if r_key is None else TaskRef(r_key), None, Y.name, "ij"]
    numblocks = {Y.name: Y.numblocks}
    for p in pieces + [co_piece] + rhs_pieces:
        pairs += p.pair(nb) if p is not None else [None, None]
        numblocks.update(p.numblocks() if p is not None else {})
    layer = core_blockwise(functools.partial(_solve_chunk, func), name, "j", *pairs,
                           numblocks=numblocks, concatenate=None)
    r_deps = [] if r_key is None else [Delayed(r_key, {r_key: Rm})]
    solved = da.Array(HighLevelGraph.from_collections(name, layer, dependencies=deps + r_deps), name,
                      chunks=(col_chunks,), dtype=object, meta=np.empty((0,), dtype=object))
    chunks = LazyChunks(solved, n, xdt, solver, n_best, squeeze,
                        recipe=recipe, r_key=r_key, R=Rm, deps=deps)
    x, cost, status, info = chunks.outputs()
    info["chunks"] = col_chunks
    info["time"] = time.perf_counter() - t0  # building the graph; the solve runs at compute
    return BILSResult(x=x, cost=cost, status=status, backend=be, solver=solver, info=info,
                      _chunks=chunks)


# ---------------------------------------------------------------------- the chunks behind a lazy result
class LazyChunks:
    """The per-chunk solves behind a lazy :class:`~bils.BILSResult`.

    ``solved`` is a 1-D dask array of dtype object whose block ``j`` is the tuple
    ``(x, cost, status, info)`` of column chunk ``j`` (``x`` in the compact code type,
    ``info`` the per-RHS entries). ``recipe`` maps ``j`` to that chunk's solve task (a
    legacy task tuple whose keys are ``r_key`` and keys of ``deps``), so other per-chunk
    work can run *inside* the solve's task (:meth:`reduce`); it is None once the chunks
    are persisted (then ``solved``'s blocks are finished results).
    """

    def __init__(self, solved, n, xdt, solver, n_best, squeeze, *, recipe=None, r_key=None, R=None,
                 deps=()):
        self.solved, self.n, self.xdt, self.solver = solved, n, np.dtype(xdt), solver
        self.n_best, self.squeeze = n_best, squeeze
        self.recipe, self.r_key, self.R, self.deps = recipe, r_key, R, list(deps)

    @property
    def col_chunks(self):
        return self.solved.chunks[0]

    def outputs(self):
        """Lazy ``x``, ``cost``, ``status`` and per-RHS ``info`` entries: getters of ``solved``."""
        import dask.array as da

        solved, name, col_chunks, n = self.solved, self.solved.name, self.col_chunks, self.n
        lead_axes = "abc"

        def lazy(suffix, index, chunks, dtype, getter=operator.getitem):
            lead = lead_axes[:len(chunks) - 1]
            return da.blockwise(getter, lead + "j", solved, "j", index, None,
                                new_axes={ax: c[0] for ax, c in zip(lead, chunks[:-1])},
                                name=f"{name}-{suffix}", dtype=dtype,
                                meta=np.empty((0,) * len(chunks), dtype=dtype))

        x = lazy("x", 0, ((n,), col_chunks), self.xdt)
        cost = lazy("cost", 1, (col_chunks,), np.float64)
        status = lazy("status", 2, (col_chunks,), np.int8)
        info = {}
        for key, dtype in _RHS_INFO.get(self.solver, {}).items():
            info[key] = lazy(key, key, (col_chunks,), dtype, _info_get)
        if self.n_best > 1:
            m = self.n_best
            info["best_x"] = lazy("best_x", "best_x", ((m,), (n,), col_chunks), np.int64, _info_get)
            info["best_cost"] = lazy("best_cost", "best_cost", ((m,), col_chunks), np.float64, _info_get)
        if self.squeeze:
            x, cost, status = x[:, 0], cost[0], status[0]
            info = {key: v[..., 0] for key, v in info.items()}
        return x, cost, status, info

    def compute(self, **kwargs):
        """``(x, cost, status, info)`` in memory: one task per chunk, gathered as tuples and
        joined here (no getter or concatenation task on the cluster).

        On a (synchronous) ``distributed.Client`` each chunk's tuple is fetched as soon as
        its task finishes, while the others still run (``dask.compute`` would wait for the
        last task and then fetch every chunk): only the last chunk's transfer is left
        after the last solve."""
        # unoptimized: a blockwise ``Y`` (``da.from_array``) fused into the solves would
        # leave an alias task per chunk under the solve's key, one more task per chunk
        parts = self.solved.to_delayed(optimize_graph=False).ravel().tolist()
        return _join(_compute_each(parts, kwargs), self.squeeze)

    def persist(self, **kwargs):
        """The same chunks with every solve finished (kept where it ran)."""
        import dask

        (kept,) = dask.persist(self.solved, **{"optimize_graph": False, **kwargs})  # as in compute()
        return LazyChunks(kept, self.n, self.xdt, self.solver, self.n_best, self.squeeze)

    def reduce(self, chunk, aggregate):
        """A ``Delayed`` of ``aggregate([chunk(x_j, cost_j, status_j) for every chunk j])``:
        ``chunk`` runs inside chunk ``j``'s solve task (or on its persisted tuple), then
        one task aggregates the partial results."""
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        dsk, deps, keys, token = self._partials(chunk, aggregate)
        out = f"bils-reduce-{token}"
        dsk[out] = (_aggregate, aggregate, keys)
        return Delayed(out, HighLevelGraph.from_collections(out, dsk, dependencies=deps))

    def reduce_now(self, chunk, aggregate, **kwargs):
        """``aggregate([chunk(x_j, cost_j, status_j) for every chunk j])`` computed now: the
        partial results come to this process and are aggregated here (no aggregation task).

        On a synchronous ``distributed.Client`` each partial result is fetched as soon as
        its task finishes; otherwise ``dask.compute(**kwargs)`` of the partial results."""
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        dsk, deps, keys, token = self._partials(chunk, aggregate)
        layer = f"bils-reduce-chunk-{token}"
        graph = HighLevelGraph.from_collections(layer, dsk, dependencies=deps)
        parts = [Delayed(key, graph, layer=layer) for key in keys]
        return aggregate(_compute_each(parts, kwargs))

    def _partials(self, chunk, aggregate):
        """The per-chunk tasks of :meth:`reduce`: (graph dict, dependencies, keys, token)."""
        from dask.base import tokenize

        token = tokenize(self.solved.name, chunk, aggregate)
        part = f"bils-reduce-chunk-{token}"
        nb = len(self.col_chunks)
        if self.recipe is not None:  # solve and reduce in one task per chunk
            dsk = {} if self.r_key is None else {self.r_key: self.R}
            dsk.update({(part, j): (_reduce_block, chunk, self.squeeze) + self.recipe[j] for j in range(nb)})
            deps = self.deps
        else:  # persisted chunks: reduce each finished tuple
            dsk = {(part, j): (_reduce_kept, chunk, self.squeeze, (self.solved.name, j)) for j in range(nb)}
            deps = [self.solved]
        return dsk, deps, [(part, j) for j in range(nb)], token


def _compute_each(parts, kwargs):
    """The values of the ``Delayed`` objects ``parts``, in order: on a synchronous
    ``distributed.Client`` each fetched as soon as its task finishes (the others still
    running), else one ``dask.compute(*parts, **kwargs)``."""
    client = _sync_client(kwargs)
    if client is None:
        import dask

        return list(dask.compute(*parts, **kwargs))
    from distributed import as_completed

    futures = client.compute(parts)
    where = {f.key: j for j, f in enumerate(futures)}
    values = [None] * len(futures)
    for future, value in as_completed(futures, with_results=True):
        values[where[future.key]] = value
    return values


def _sync_client(kwargs):
    """The synchronous ``distributed.Client`` that ``dask.compute(**kwargs)`` would use, or
    None (another scheduler, an asynchronous client, or options other than ``scheduler``)."""
    if "distributed" not in sys.modules or set(kwargs) - {"scheduler"}:
        return None
    from dask.base import get_scheduler
    from distributed import Client

    client = getattr(get_scheduler(scheduler=kwargs.get("scheduler")), "__self__", None)
    if isinstance(client, Client) and not client.asynchronous:
        return client
    return None


def _squeezed(out, squeeze):
    x, cost, status = out[:3]
    return (x[:, 0], cost[0], status[0]) if squeeze else (x, cost, status)


def _reduce_block(chunk, squeeze, solve, *args):
    return chunk(*_squeezed(solve(*args), squeeze))


def _reduce_kept(chunk, squeeze, out):
    return chunk(*_squeezed(out, squeeze))


def _aggregate(aggregate, parts):
    return aggregate(list(parts))


def sum_partials(parts):
    """The default ``aggregate`` of :meth:`~bils.BILSResult.reduce_chunks`: the sum of the
    partial results, field by field when they are tuples."""
    if isinstance(parts[0], tuple):
        return tuple(functools.reduce(operator.add, field) for field in zip(*parts))
    return functools.reduce(operator.add, parts)


def _join(blocks, squeeze):
    """In-memory ``(x, cost, status, info)`` from the per-chunk tuples, in column order."""
    x = np.concatenate([b[0] for b in blocks], axis=-1)
    cost = np.concatenate([b[1] for b in blocks], axis=-1)
    status = np.concatenate([b[2] for b in blocks], axis=-1)
    info = {key: np.concatenate([b[3][key] for b in blocks], axis=-1) for key in blocks[0][3]}
    if squeeze:
        x, cost, status = x[:, 0], cost[0], status[0]
        info = {key: v[..., 0] for key, v in info.items()}
    return x, cost, status, info


# ---------------------------------------------------------------------- BILSProblem with dask targets
def map_columns(func, const, Y, rows, dtype=np.float64):
    """``func(const, block)`` for every column chunk of the dask array ``Y`` (n, k).

    ``const`` (in memory) is one graph key shared by every chunk task; each output block
    has ``rows`` rows and the chunk's columns.
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    Y = Y.rechunk({0: -1})
    c_key = f"bils-const-{tokenize(const)}"
    out = f"bils-{getattr(func, '__name__', 'map')}-{tokenize(func, c_key, Y.name)}"
    dsk = {c_key: const}
    for j in range(Y.numblocks[1]):
        dsk[(out, 0, j)] = (func, c_key, (Y.name, 0, j))
    graph = HighLevelGraph.from_collections(out, dsk, dependencies=[Y])
    return da.Array(graph, out, chunks=((rows,), Y.chunks[1]), dtype=dtype,
                    meta=np.empty((0, 0), dtype=dtype))


def _targets_iv(name, T, rows, rows_rule):
    """Shape and dtype checks of dask targets; values are checked per chunk when solved."""
    _check_dtype(name, T)
    if T.ndim not in (1, 2) or T.shape[0] != rows:
        raise ValueError(f"`{name}` must have {rows_rule} = {rows} rows, got shape {T.shape}")
    squeeze = T.ndim == 1
    T = T.reshape(rows, -1).astype(np.float64)
    if T.shape[1] == 0 or any(np.isnan(c) for c in T.shape):
        raise ValueError(f"`{name}` must have at least one column (and known chunk sizes)")
    return T.map_blocks(_finite_block, name, dtype=np.float64), squeeze


def _finite_block(block, name):
    if not np.all(np.isfinite(block)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")
    return block


def _left_multiply(M, B):
    return M @ B


def _trmm(R, B):
    from .problem import _triangular_times

    return _triangular_times(R, np.array(B, dtype=np.float64, order="C"))


def build_problem(cls, R, Y, lo, hi, scale, offset, squeeze, ordering, cost_offset, *, gram, dead):
    """:meth:`BILSProblem._build` for a dask ``Y`` (R in memory, already validated)."""
    from .ordering import column_order

    if ordering == "chang_han":
        raise NotImplementedError("ordering='chang_han' (per-RHS orderings) is not supported with "
                                  "dask targets; use a shared ordering such as 'diag' or 'sqrd'")
    from .problem import _rows

    n, k = Y.shape
    for nm, g in (("lo", lo), ("hi", hi), ("scale", scale), ("offset", offset)):
        if isinstance(g, GroupedGrid):
            _check_grouped(nm, g, n, k)
    # a GroupedGrid stays one (its values are cut by column chunks when solving)
    grids = [a.astype(t) if isinstance(a, GroupedGrid) else _grid_2d(nm, a, n, k, squeeze, d).astype(t)
             for nm, a, d, t in
             (("lo", lo, 0, np.int64), ("hi", hi, 0, np.int64), ("scale", scale, 1.0, np.float64),
              ("offset", offset, 0.0, np.float64))]
    for nm, g in zip(("lo", "hi", "scale", "offset"), (lo, hi, scale, offset)):
        if g is not None and not isinstance(g, GroupedGrid):
            _check_dtype(nm, g if is_dask_array(g) else np.asarray(g))
    cost_offset = cost_offset if is_dask_array(cost_offset) else np.asarray(cost_offset, dtype=np.float64)
    if ordering == "natural":
        return cls(R, Y, *grids, None, cost_offset, dead, squeeze)
    G = gram if gram is not None else R.T @ R
    perm = column_order(G, ordering)
    Q, Rp = np.linalg.qr(R[:, perm])
    sign = np.sign(np.diag(Rp))
    sign[sign == 0] = 1.0
    Rp = sign[:, None] * Rp
    Yp = map_columns(_left_multiply, np.ascontiguousarray((Q * sign[None, :]).T), Y, n)
    grids = [_rows(g, perm) for g in grids]
    return cls(np.triu(Rp), Yp, *grids, perm, cost_offset, dead, squeeze)


def problem_from_triangular(cls, R, Y, lo, hi, scale, offset, ordering):
    """:meth:`BILSProblem.from_triangular` with dask right-hand sides ``Y``."""
    from ._validate import triangular_iv

    R = triangular_iv(R)
    Y, squeeze = _targets_iv("Y", Y, R.shape[0], "`R.shape[0]`")
    return build_problem(cls, R, Y, lo, hi, scale, offset, squeeze, ordering, np.zeros(Y.shape[1]),
                         gram=None, dead=None)


def problem_from_design(cls, A, B, lo, hi, scale, offset, ordering):
    """:meth:`BILSProblem.from_design` with dask observations ``B`` (``A`` in memory)."""
    import dask.array as da

    B, squeeze = _targets_iv("B", B, A.shape[0], "`A.shape[0]`")
    Q, R = np.linalg.qr(A)
    if np.any(np.abs(np.diag(R)) <= 1e-13 * max(1.0, np.abs(R).max())):
        raise ValueError("`A` must have full column rank")
    Y = map_columns(_left_multiply, np.ascontiguousarray(Q.T), B, A.shape[1])
    cost_offset = da.maximum(da.sum(B * B, axis=0) - da.sum(Y * Y, axis=0), 0.0)
    return build_problem(cls, R, Y, lo, hi, scale, offset, squeeze, ordering, cost_offset,
                         gram=A.T @ A, dead=None)


def gram_targets(T, n):
    """Validated dask targets of :meth:`BILSProblem.from_gram`: (T (n, k) float64, squeeze)."""
    return _targets_iv("T", T, n, "`H.shape[0]`")


def gram_problem(cls, R, T, perm, dead, lo, hi, scale, offset, squeeze):
    """The rest of :meth:`BILSProblem.from_gram` for dask targets ``T`` (n, k).

    ``R`` is the Cholesky factor of the permuted, damped Gram matrix and ``perm`` the
    shared ordering (None for natural); ``Y = R T[perm]`` per column chunk.
    """
    import dask.array as da

    n, k = T.shape
    if dead is not None and dead.any():
        T = da.where(dead[:, None], 0.0, T)
    Tp = T if perm is None else T[perm]
    Y = map_columns(_trmm, R, Tp, n)

    def rows(a):  # grids in original order -> solve order
        if a is None or perm is None:
            return a
        if isinstance(a, GroupedGrid):
            return a.permuted(perm)
        a = a if is_dask_array(a) else np.asarray(a)
        if (a.ndim == 2 or (a.ndim == 1 and squeeze)) and a.shape[0] == n and n > 1:
            return a[perm]
        return a

    prob = build_problem(cls, R, Y, *(rows(a) for a in (lo, hi, scale, offset)), squeeze,
                         "natural", np.zeros(k), gram=None, dead=dead)
    return cls(prob.R, prob.Y, prob.lo, prob.hi, prob.scale, prob.offset, perm,
               prob.cost_offset, dead, squeeze)

"""The one result type every solver returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

__all__ = ["BILSResult", "Status", "STATUS_MESSAGES"]


class Status(enum.IntEnum):
    """Per-RHS termination status.

    ``OPTIMAL``
        The returned point is a proven minimiser over the box.
    ``HEURISTIC``
        The solver makes no optimality claim (Babai, Klein, K-best).
    ``BUDGET_EXHAUSTED``
        An exact search stopped at its node budget; the point is the best found.

    Examples
    --------
    >>> import numpy as np, bils
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> res = bils.enumerate(R, np.array([3.1, 0.9]), -2, 2, backend="numpy")
    >>> bils.Status(res.status)
    <Status.OPTIMAL: 0>
    >>> bils.STATUS_MESSAGES[bils.Status.BUDGET_EXHAUSTED]
    'Budget exhausted: `max_nodes` was reached; best point found returned.'
    >>> [s.name for s in bils.Status]
    ['OPTIMAL', 'HEURISTIC', 'BUDGET_EXHAUSTED']
    """

    OPTIMAL = 0
    HEURISTIC = 1
    BUDGET_EXHAUSTED = 2


STATUS_MESSAGES = MappingProxyType(
    {
        Status.OPTIMAL: "Optimal: the search proved no box point has a smaller cost.",
        Status.HEURISTIC: "Heuristic: the solver makes no optimality claim for this point.",
        Status.BUDGET_EXHAUSTED: "Budget exhausted: `max_nodes` was reached; best point found returned.",
    }
)


@dataclass(frozen=True)
class BILSResult:
    """Solution of a multi-RHS box-constrained integer least-squares problem.

    Attributes
    ----------
    x : (n, k) ndarray of int64
        Integer solution, one column per right-hand side, in the caller's
        coordinate order. ``(n,)`` when the problem had a single 1-D RHS.
        With dask right-hand sides ``x``, ``cost``, ``status`` and the per-RHS
        entries of ``info`` are lazy dask arrays chunked like ``Y``'s columns
        (see :meth:`compute`).
    cost : (k,) ndarray of float64
        ``||y_j - R (s_j * x_j + o_j)||^2`` for each RHS (plus the constant part
        outside ``range(R)`` when the problem came from a tall design matrix).
        A 0-d array for a single 1-D RHS.
    status : (k,) ndarray of int8
        :class:`Status` code per RHS.
    backend : str
        ``"numpy"``, ``"numba"`` or ``"cupy"``.
    solver : str
        Name of the solver that produced the result.
    info : mapping
        Solver statistics (read-only): e.g. ``nodes`` visited, ``n_samples``,
        ``beam_width``, ``time`` in seconds, and for ``enumerate(n_best=m)``
        the sorted lists ``best_x`` (m, n, k) and ``best_cost`` (m, k).

    Examples
    --------
    >>> import numpy as np, bils
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> Y = np.array([[3.1, 0.2], [0.9, -1.4]])  # two right-hand sides
    >>> res = bils.enumerate(R, Y, -2, 2, backend="numpy")
    >>> res
    BILSResult(solver='enumerate', backend='numpy', x.shape=(2, 2), total_cost=0.42)
    >>> res.x.tolist(), res.cost.round(6).tolist(), res.status.tolist()
    ([[1, 1], [1, -2]], [0.02, 0.4], [0, 0])
    >>> res.all_optimal, res.info["nodes"].tolist()
    (True, [4, 7])
    >>> bils.babai(R, Y[:, 0], -2, 2, backend="numpy").messages
    ['Heuristic: the solver makes no optimality claim for this point.']
    """

    x: Any
    cost: Any
    status: Any
    backend: str
    solver: str
    info: Mapping[str, Any] = field(default_factory=dict)
    # the per-chunk solves behind a lazy result (bils._dask.LazyChunks); None in memory
    _chunks: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @property
    def messages(self) -> list[str]:
        """Human-readable status message per RHS."""
        st = np.asarray(_to_host(self.status)).reshape(-1)
        return [STATUS_MESSAGES[Status(int(s))] for s in st]

    @property
    def all_optimal(self) -> bool:
        """True when every RHS was proven optimal."""
        return bool(np.all(np.asarray(_to_host(self.status)) == Status.OPTIMAL))

    @property
    def is_lazy(self) -> bool:
        """True when ``x``, ``cost`` and ``status`` are dask arrays (dask right-hand sides)."""
        return _is_dask(self.x)

    def compute(self, **kwargs) -> "BILSResult":
        """The in-memory result: one ``dask.compute`` of every lazy field (a no-op otherwise).

        Computing ``x``, ``cost`` and ``status`` separately would run every chunk's solve
        once per field; this runs each once, as one task per chunk whose tuple of fields
        is gathered and joined here. ``kwargs`` go to :func:`dask.compute`
        (e.g. ``scheduler="threads"``); without them the active scheduler is used (a
        ``distributed.Client`` when one exists).

        Examples
        --------
        >>> import numpy as np, dask.array as da, bils
        >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
        >>> Y = da.from_array(np.array([[3.1, 0.2, 1.0], [0.9, -1.4, 0.5]]), chunks=(2, 2))
        >>> lazy = bils.babai(R, Y, -2, 2, backend="numpy")
        >>> lazy.is_lazy, lazy.compute(scheduler="sync").x.tolist()
        (True, [[1, 1, 0], [1, -1, 1]])
        """
        return self._through_dask("compute", kwargs)

    def persist(self, **kwargs) -> "BILSResult":
        """The result with every lazy field computed and kept where it was computed.

        One :func:`dask.persist` of the per-chunk solves: each chunk is solved once, in one
        task, and on a ``distributed`` cluster its ``(x, cost, status, info)`` stays in the
        worker's memory (nothing is sent to the client). The fields are still dask arrays,
        now getters of the finished chunks, so later reductions (``res.cost.sum()``),
        slices, :meth:`reduce_chunks` and ``compute()`` reuse them without solving again.
        ``kwargs`` go to :func:`dask.persist`. A no-op for an in-memory result.

        Examples
        --------
        >>> import numpy as np, dask.array as da, bils
        >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
        >>> Y = da.from_array(np.array([[3.1, 0.2, 1.0], [0.9, -1.4, 0.5]]), chunks=(2, 2))
        >>> kept = bils.babai(R, Y, -2, 2, backend="numpy").persist(scheduler="sync")
        >>> kept.is_lazy, kept.x.dtype.name, kept.x[:, 1].compute().tolist()
        (True, 'int8', [1, -1])
        """
        return self._through_dask("persist", kwargs)

    def _through_dask(self, name, kwargs) -> "BILSResult":
        """The result with ``x``, ``cost``, ``status`` and the lazy ``info`` entries passed
        together through ``dask.<name>`` (``compute`` or ``persist``); ``self`` when in memory.

        A solver's lazy result goes through its per-chunk solve tuples: one task per chunk
        (no getter tasks), gathered and joined in this process by ``compute``."""
        if not self.is_lazy:
            return self
        chunks = self._chunks
        if chunks is not None:
            if name == "compute":
                x, cost, status, values = chunks.compute(**kwargs)
            else:
                chunks = chunks.persist(**kwargs)
                x, cost, status, values = chunks.outputs()
        else:  # lazy fields assembled by hand
            import dask

            lazy = {key: v for key, v in self.info.items() if _is_dask(v)}
            x, cost, status, values = getattr(dask, name)(self.x, self.cost, self.status, lazy, **kwargs)
            chunks = None
        return BILSResult(x=x, cost=cost, status=status, backend=self.backend, solver=self.solver,
                          info=dict(self.info, **values), _chunks=chunks if name == "persist" else None)

    def reduce_chunks(self, chunk, aggregate=None, *, compute=False, **kwargs):
        """Reduce the result chunk by chunk, where each chunk is solved.

        .. math::

            \\text{aggregate}\\big([\\,\\text{chunk}(X_{:,J_1}, c_{J_1}, s_{J_1}), \\dots,
            \\text{chunk}(X_{:,J_B}, c_{J_B}, s_{J_B})\\,]\\big)

        over the column chunks :math:`J_1, \\dots, J_B` of ``Y`` (one chunk, all columns, for
        an in-memory result).

        Parameters
        ----------
        chunk : callable ``chunk(x, cost, status) -> partial``
            Gets one chunk's codes ``x`` (n, k_j) (in the compact integer type of a lazy
            result), ``cost`` (k_j,) float64 and ``status`` (k_j,) int8 — ``x`` (n,) and 0-d
            ``cost``, ``status`` for a single 1-D right-hand side — and returns any object.
        aggregate : callable ``aggregate(parts) -> value``, optional
            Combines the list of partial results, in column order. Default: their sum
            (``+``), field by field when they are tuples.
        compute : bool, default False
            Compute now and return the value: the partial results come to the caller and
            ``aggregate`` runs here, not in a task. On a ``distributed.Client`` each
            partial result is fetched as soon as its chunk is done, so after the last
            solve only its partial result travels (no aggregation task to schedule, no
            partial results to move between workers). ``kwargs`` go to
            :func:`dask.compute` (e.g. ``scheduler="threads"``).

        Returns
        -------
        dask.delayed.Delayed or object
            With dask right-hand sides a ``Delayed`` whose graph has one task per chunk —
            the solve and ``chunk`` together, so only the partial result leaves the task —
            and one aggregation task; with ``compute=True`` or for an in-memory result
            the value itself.

        Notes
        -----
        This is the cheapest way to keep a large result on the cluster:
        ``dask.compute(res.cost.sum(), res.x.sum(axis=1))`` runs three tasks per chunk
        (the solve, and one per output) plus a reduction tree per output, and each task
        costs the scheduler and the worker milliseconds of CPU. The solves run inside
        these tasks: to reduce *and* keep or gather the codes, :meth:`persist` first (the
        kept chunks are then reduced where they are). Float partial sums are added in
        chunk order, so a total cost equals the in-memory ``cost.sum()`` to rounding;
        integer sums are exact.

        Examples
        --------
        >>> import numpy as np, dask.array as da, bils
        >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
        >>> Y = da.from_array(np.array([[3.1, 0.2, 1.0], [0.9, -1.4, 0.5]]), chunks=(2, 2))
        >>> lazy = bils.babai(R, Y, -2, 2, backend="numpy")
        >>> total = lazy.reduce_chunks(lambda x, cost, status: (cost.sum(), x.sum(axis=1, dtype=np.int64)))
        >>> cost, rows = total.compute(scheduler="sync")
        >>> round(float(cost), 6), rows.tolist()
        (1.07, [2, 1])
        >>> lazy.reduce_chunks(lambda x, cost, status: cost.size, compute=True, scheduler="sync")  # RHS count
        3
        """
        if aggregate is None:
            from ._dask import sum_partials as aggregate
        if kwargs and not compute:
            raise TypeError(f"`reduce_chunks` takes dask.compute options only with compute=True, got {sorted(kwargs)}")
        if not self.is_lazy:
            return aggregate([chunk(self.x, self.cost, self.status)])
        chunks = self._chunks
        if chunks is None:
            raise TypeError("`reduce_chunks` needs a lazy result made by a solver (or its `persist()`)")
        if compute:
            return chunks.reduce_now(chunk, aggregate, **kwargs)
        return chunks.reduce(chunk, aggregate)

    def __repr__(self) -> str:  # compact: arrays can be huge
        shape = getattr(self.x, "shape", None)
        total = "<lazy>" if self.is_lazy else f"{float(np.sum(_to_host(self.cost))):.6g}"
        return (
            f"BILSResult(solver={self.solver!r}, backend={self.backend!r}, x.shape={shape}, "
            f"total_cost={total})"
        )


def _is_dask(a) -> bool:
    return type(a).__module__.startswith("dask.array")


def _to_host(a):
    get = getattr(a, "get", None)  # cupy arrays
    return get() if callable(get) else a

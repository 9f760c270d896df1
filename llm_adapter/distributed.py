r"""Layer solves on a ``distributed`` cluster, split by output rows.

:func:`llm_adapter.methods.uniform.quantize_weight` is row-separable: every output row
:math:`w_j` of ``W`` is one right-hand side of the layer's BILS problem. The grid
(scales, zero points, MSE clip search) is computed per row; ``H`` (and ``D``) give the
same damped Gram matrix, Cholesky factor and ordering in every call; the targets
:math:`W_\alpha = W + \alpha\,(H^{-1} D^\top W^\top)^\top` are row by row; Babai, K-best
and Klein solve each RHS on its own. Only two things couple the rows, and both are
handled here:

* Klein's per-RHS seeds are drawn in row order from ``rng`` (``ojbkq``). A task for rows
  ``r0:r1`` gets a copy of the caller's generator advanced past ``r0`` draws, so it
  draws exactly the seeds the whole-layer call gives those rows; the caller's own
  generator is advanced by ``m`` draws, as the local call would.
* RegCal with ``alpha="closed_form"`` (and a ``D``) picks one :math:`\alpha^*` from all
  rows; such a layer is solved as a single task.

So :meth:`LayerSolveExecutor.submit` returns the same :class:`QuantizedLayer` as
``quantize_weight`` bit for bit (``codes``, ``scales``, ``zeros``, ``g_idx``, ``perm``,
``bias``); the additive diagnostics in ``stats`` (``loss``, ``objective``,
``babai_bound``) are sums over the row blocks and equal the local values to floating-point
rounding (summation order); ``clipped_frac`` is exact.

``H`` and ``D`` are scattered once per layer (and reused for layers submitted with the
same ``H`` object, e.g. q/k/v); each worker fetches them once.

:class:`ClusterSolver` is the calibration driver's layer solver on top of this
(``quantize_model(..., client=)``, ``llm-adapter quantize --scheduler`` / ``--workers``):
row-split solves for the built-in row-separable methods, one task per layer for the others.

Examples
--------
>>> import numpy as np
>>> from distributed import Client, LocalCluster
>>> from llm_adapter import QuantSpec, quantize_weight
>>> from llm_adapter.distributed import LayerSolveExecutor
>>> rng = np.random.default_rng(0)
>>> W = rng.standard_normal((64, 32)); X = rng.standard_normal((32, 256)); H = X @ X.T
>>> spec = QuantSpec(bits=3, group_size=16, method="gptq")
>>> with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, host="127.0.0.1",
...                   protocol="tcp", dashboard_address=None) as cluster, Client(cluster) as client:
...     ex = LayerSolveExecutor(client, rows_per_task=16)
...     remote = ex.submit(W, H, None, spec, backend="numpy").result(timeout=60)
>>> local = quantize_weight(W, H, None, spec, backend="numpy")
>>> bool(np.array_equal(remote.codes, local.codes)), remote.stats["tasks"]
(True, 4)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import OrderedDict

import numpy as np

from . import methods
import dataclasses

from . import methods

__all__ = ["ClusterSolver", "LayerSolveExecutor", "LayerFuture", "ClusterLostError", "row_blocks"]

logger = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max


class ClusterLostError(RuntimeError):
    """The cluster went away (or stopped answering) while a layer was being solved."""


def row_blocks(m, rows_per_task):
    """``[(r0, r1), ...]`` covering ``range(m)`` in blocks of at most ``rows_per_task`` rows.

    Examples
    --------
    >>> row_blocks(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    if rows_per_task < 1:
        raise ValueError(f"`rows_per_task` must be >= 1, got {rows_per_task}")
    return [(r0, min(m, r0 + rows_per_task)) for r0 in range(0, m, rows_per_task)]


def _row_spec(spec):
    """`spec` (default: gptq's default spec) if it is the spec of a row-separable method."""
    if spec is None:
        spec = methods.get("gptq").spec_type()
    method = getattr(spec, "method", None)
    if method not in ROW_SEPARABLE or not isinstance(spec, methods.get(method).spec_type):
        raise TypeError(f"`spec` must be the spec of a row-separable method {ROW_SEPARABLE} (a QuantSpec), "
                        f"got {type(spec).__name__}")
    return spec


def _row_separable(spec, D):
    return not (spec.method == "regcal" and spec.alpha == "closed_form" and D is not None)


def _solve_rows(W, H, D, spec, backend, rng, skip):
    """Worker side: ``quantize_weight`` on rows ``r0:r1`` of a layer, ``skip = r0``.

    ``rng`` is a private copy of the caller's generator (or None); advancing it by
    ``skip`` 64-bit draws makes Klein draw the seeds the whole-layer call gives these rows.
    """
    if rng is not None and skip:
        rng.integers(0, _INT64_MAX, size=skip, dtype=np.int64)
    return methods.get(spec.method).quantize(W, H, D, spec, backend=backend, rng=rng)


class LayerFuture:
    """The pending result of one :meth:`LayerSolveExecutor.submit` (one layer).

    Like :class:`concurrent.futures.Future`: :meth:`result` blocks and returns the
    assembled :class:`~llm_adapter.methods.uniform.QuantizedLayer`, :meth:`done` polls,
    :meth:`cancel` drops the tasks.
    """

    def __init__(self, futures, blocks, shape, bias, name, t0):
        self._futures, self._blocks, self._shape = futures, blocks, shape
        self._bias, self.name, self._t0 = bias, name, t0
        self._layer = None

    def done(self) -> bool:
        """True when every row block has finished (or failed)."""
        return self._layer is not None or all(f.done() for f in self._futures)

    def cancel(self):
        """Cancel the row-block tasks that have not run yet."""
        for f in self._futures:
            f.cancel()

    def result(self, timeout=None):
        """Wait for every row block and assemble the layer.

        Raises
        ------
        ClusterLostError
            When the scheduler connection is lost or `timeout` (seconds) passes.
        Exception
            Whatever ``quantize_weight`` raised in a task (e.g. a ``ValueError`` on
            bad inputs), re-raised here.
        """
        if self._layer is not None:
            return self._layer
        deadline = None if timeout is None else time.monotonic() + timeout
        parts = []
        try:
            for f in self._futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                parts.append(f.result(timeout=left))
        except _lost_errors() as err:
            raise ClusterLostError(
                f"layer {self.name!r}: the dask cluster did not return its row blocks "
                f"({type(err).__name__}: {err}); layers finished before are unaffected") from err
        self._layer = self._build(parts)
        self._futures = []
        return self._layer

    def _build(self, parts):
        return _assemble(parts, self._blocks, self._shape, self._bias, self._t0)


class _WholeLayerFuture(LayerFuture):
    """One task that solves a whole layer (a method that is not split by rows)."""

    def _build(self, parts):
        return parts[0]


def _assemble(parts, blocks, shape, bias, t0):
    first = parts[0]
    for p in parts[1:]:
        if not (np.array_equal(p.g_idx, first.g_idx) and
                (p.perm is None) == (first.perm is None) and
                (p.perm is None or np.array_equal(p.perm, first.perm))):
            raise RuntimeError("row blocks disagree on g_idx/perm: the workers run different "
                               "versions of llm_adapter/bils")
    codes = np.concatenate([p.codes for p in parts], axis=0)
    scales = np.concatenate([p.scales for p in parts], axis=0)
    zeros = np.concatenate([p.zeros for p in parts], axis=0)
    assert codes.shape == shape
    stats = dict(first.stats)
    sizes = [(r1 - r0) * shape[1] for r0, r1 in blocks]
    for key in ("loss", "objective", "babai_bound"):
        vals = [p.stats.get(key) for p in parts]
        stats[key] = None if any(v is None for v in vals) else float(sum(vals))
    if stats.get("loss") is not None:
        refs = [p.stats["loss"] / p.stats["rel_loss"] if p.stats["rel_loss"] else None for p in parts]
        if all(r is not None for r in refs) and sum(refs) > 0:
            stats["rel_loss"] = stats["loss"] / float(sum(refs))
    if all(p.stats.get("clipped_frac") is not None for p in parts):
        count = sum(round(p.stats["clipped_frac"] * s) for p, s in zip(parts, sizes))
        stats["clipped_frac"] = float(count / sum(sizes))
    for key in ("kbest_wins",):
        if key in stats:
            stats[key] = float(sum(p.stats[key] * (r1 - r0) for p, (r0, r1) in zip(parts, blocks))
                               / shape[0])
    stats["time"] = time.perf_counter() - t0
    stats["tasks"] = len(parts)
    # the rows' layer type (a uniform layer), with the assembled arrays
    return dataclasses.replace(first, codes=codes, scales=scales, zeros=zeros, bias=bias, stats=stats)


class LayerSolveExecutor:
    """Submit layer solves (``quantize_weight`` calls) to a ``distributed.Client``.

    Parameters
    ----------
    client : distributed.Client
        Any client: a ``LocalCluster``, a scheduler address, dask-jobqueue, Kubernetes.
    rows_per_task : int, optional
        Output rows per task. Every task repeats the per-layer work that does not
        depend on the rows (damping, Cholesky factor of ``H`` and ordering, :math:`O(n^3)`),
        so fewer, larger tasks are cheaper as long as the workers stay busy. Default:
        ``ceil(threads / 4)`` tasks per layer (one per layer on a small cluster, where
        the layers submitted together — 7 per transformer block — already fill it).

    Notes
    -----
    Workers must import the same ``llm_adapter`` and ``bils`` versions; with
    ``backend="auto"`` each worker falls back to numpy when numba is missing there,
    which can change codes at ties — pass an explicit backend on mixed clusters.
    """

    def __init__(self, client, *, rows_per_task=None):
        if rows_per_task is not None and (isinstance(rows_per_task, bool) or
                                          not isinstance(rows_per_task, int) or rows_per_task < 1):
            raise ValueError(f"`rows_per_task` must be a positive int or None, got {rows_per_task!r}")
        self.client = client
        self.rows_per_task = rows_per_task
        self._scattered = OrderedDict()  # id(H), id(D) -> (H, D, futures); last two layers' stats

    def _threads(self):
        try:
            return max(1, sum(self.client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a client that cannot answer: a conservative guess
            return 1

    def _rows(self, m):
        if self.rows_per_task is not None:
            return self.rows_per_task
        return math.ceil(m / max(1, math.ceil(self._threads() / 4)))

    def _scatter(self, H, D):
        key = (id(H), id(D))
        if key in self._scattered:
            self._scattered.move_to_end(key)
            return self._scattered[key][2]
        futs = self.client.scatter([H, D], hash=False)
        self._scattered[key] = (H, D, futs)  # strong refs keep the ids valid
        while len(self._scattered) > 2:
            self._scattered.popitem(last=False)
        return futs

    def submit(self, W, H=None, D=None, spec=None, *, backend="auto", rng=None,
               bias=None, name=None) -> LayerFuture:
        """Start ``quantize_weight(W, H, D, spec, backend=..., rng=..., bias=...)`` on the cluster.

        Returns at once with a :class:`LayerFuture`; the driver can go on with other
        layers (or forward passes) and call ``.result()`` when it needs this one.

        Parameters
        ----------
        W, H, D, spec, backend, rng, bias
            As in :func:`llm_adapter.methods.uniform.quantize_weight` (numpy arrays; torch
            tensors are converted on the driver). ``rng`` may be None, an int or a
            ``numpy.random.Generator`` (advanced as the local call would advance it).
        name : str, optional
            Layer name for error messages and task keys.
        """
        t0 = time.perf_counter()
        spec = _row_spec(spec)
        W = _host(W)
        H, D = _host(H), _host(D)
        if W.ndim != 2:
            raise ValueError(f"`W` must be 2-D (out, in), got shape {W.shape}")
        m = W.shape[0]
        gen = None
        if rng is not None:
            try:
                gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            except (TypeError, ValueError):
                raise TypeError("`rng` must be None, a non-negative int or a numpy.random.Generator") from None
        template = copy.deepcopy(gen)  # the state the local call would start from
        if gen is not None and spec.method == "ojbkq":
            gen.integers(0, _INT64_MAX, size=m, dtype=np.int64)  # the draws the local call makes
        rows = m if not _row_separable(spec, D) else self._rows(m)
        blocks = row_blocks(m, rows)
        label = name or "layer"
        with self._guard(label):
            h_fut, d_fut = self._scatter(H, D)
            futures = [
                self.client.submit(_solve_rows, W[r0:r1], h_fut, d_fut, spec, backend, template, r0,
                                   key=f"bils-layer-{label}-{r0}-{r1}-{time.monotonic_ns()}",
                                   pure=False)
                for r0, r1 in blocks
            ]
        bias = None if bias is None else _host(bias).astype(np.float32)
        logger.debug("layer %s: %d rows in %d tasks", label, m, len(blocks))
        return LayerFuture(futures, blocks, W.shape, bias, label, t0)

    @contextlib.contextmanager
    def _guard(self, label):
        """Submission errors that mean the cluster is gone become :class:`ClusterLostError`."""
        try:
            yield
        except Exception as err:
            if isinstance(err, _lost_errors()) or getattr(self.client, "status", "running") != "running" \
                    or not _scheduler_alive(self.client):
                raise ClusterLostError(f"layer {label!r}: cannot submit to the dask cluster "
                                       f"({type(err).__name__}: {err})") from err
            raise

    def submit_whole(self, fn, W, H=None, D=None, *args, name=None, **kwargs) -> LayerFuture:
        """Start ``fn(W, H, D, *args, **kwargs)`` as one task (a layer that is not split by rows).

        ``H`` and ``D`` are scattered as in :meth:`submit` (shared with other layers
        submitted with the same objects); ``fn`` must be importable on the workers.
        """
        t0 = time.perf_counter()
        W, H, D = _host(W), _host(H), _host(D)
        label = name or "layer"
        with self._guard(label):
            h_fut, d_fut = self._scatter(H, D)
            fut = self.client.submit(fn, W, h_fut, d_fut, *args, **kwargs,
                                     key=f"bils-layer-{label}-whole-{time.monotonic_ns()}", pure=False)
        return _WholeLayerFuture([fut], [(0, W.shape[0])], W.shape, None, label, t0)

    def quantize_weight(self, W, H=None, D=None, spec=None, *, backend="auto",
                        rng=None, bias=None, timeout=None):
        """``submit(...).result(timeout)``: a drop-in for the local ``quantize_weight``."""
        return self.submit(W, H, D, spec, backend=backend, rng=rng, bias=bias).result(timeout)


#: Built-in uniform methods whose solve is row-separable (see the module notes); other
#: methods (glvq, methods registered by users) are solved as one task per layer.
ROW_SEPARABLE = ("rtn", "gptq", "ojbkq", "regcal")


def _solve_whole(W, H, D, spec, backend, rng, bias):
    """Worker side: the spec's registered method on a whole layer."""
    return methods.for_spec(spec).quantize(W, H, D, spec, backend=backend, rng=rng, bias=bias)


class ClusterSolver:
    r"""The calibration driver's layer solver on a ``distributed`` cluster.

    A :class:`llm_adapter.calibration.LayerSolver` (same ``submit`` signature; not a
    subclass, so this module does not import torch): what
    ``quantize_model(..., client=client)`` and ``llm-adapter quantize --scheduler`` /
    ``--workers`` use. Layers of the built-in row-separable methods (:data:`ROW_SEPARABLE`)
    go through :class:`LayerSolveExecutor` (split by output rows); any other method
    (``glvq``, whose lattice encoding is not row-separable, or a method registered by the
    user, which must then be registered on the workers too) is submitted as one task per
    layer. Either way the returned :class:`LayerFuture` gives the layer the local call
    gives, bit for bit, or raises :class:`ClusterLostError` naming the layer.

    Parameters
    ----------
    client : distributed.Client
    rows_per_task : int, optional
        Passed to :class:`LayerSolveExecutor`.

    Examples
    --------
    >>> import numpy as np
    >>> from distributed import Client, LocalCluster
    >>> from llm_adapter import QuantSpec, quantize_weight
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 32)); X = rng.standard_normal((32, 128)); H = X @ X.T
    >>> spec = QuantSpec(bits=3, group_size=16, method="ojbkq", n_samples=2)
    >>> with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1",
    ...                   protocol="tcp", dashboard_address=None) as cluster, Client(cluster) as client:
    ...     q = ClusterSolver(client).submit("l0", W, H, None, spec, backend="numpy",
    ...                                      rng=np.random.default_rng(5)).result()
    >>> local = quantize_weight(W, H, None, spec, backend="numpy", rng=np.random.default_rng(5))
    >>> bool(np.array_equal(q.codes, local.codes))
    True
    """

    def __init__(self, client, *, rows_per_task=None):
        self.client = client
        self.executor = LayerSolveExecutor(client, rows_per_task=rows_per_task)

    def submit(self, name, W, H, D, spec, *, backend="auto", rng=None, bias=None) -> LayerFuture:
        """Start the solve of layer `name`; returns at once (see :class:`LayerFuture`)."""
        if getattr(spec, "method", None) in ROW_SEPARABLE \
                and isinstance(spec, methods.get(spec.method).spec_type):
            return self.executor.submit(W, H, D, spec, backend=backend, rng=rng, bias=bias, name=name)
        bias = None if bias is None else _host(bias)
        return self.executor.submit_whole(_solve_whole, W, H, D, spec, backend, rng, bias, name=name)


def _scheduler_alive(client):
    try:
        client.scheduler_info()
        return client.scheduler is not None
    except Exception:  # noqa: BLE001 - any failure to answer means it is gone
        return False


def _lost_errors():
    """Exceptions meaning the scheduler is gone or does not answer in time."""
    from distributed.comm.core import CommClosedError

    return (CommClosedError, OSError, TimeoutError, distributed_cancelled())


def distributed_cancelled():
    from concurrent.futures import CancelledError

    return CancelledError


def _host(a):
    if a is None:
        return None
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)

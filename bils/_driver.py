"""One place that turns public arguments into a kernel call and a :class:`BILSResult`.

Every solver calls :func:`run_solver` with a ``kernels`` mapping from backend name to a
function ``kernel(can, **options) -> (x, cost, status, info)`` working on canonical
solve-order arrays (:class:`bils._validate.Canonical`, numpy or CuPy arrays; results are
arrays of the inputs' namespace: device inputs' results stay on the device, numpy inputs
solved by the ``cupy`` backend get numpy results). This module handles problems
given as :class:`~bils.problem.BILSProblem` (orderings, per-RHS orderings, constant cost
parts), backend resolution, timing, and mapping ``x`` back to the caller's order.
"""

from __future__ import annotations

import time

import numpy as np

from ._backend import resolve_backend
from ._dask import run_solver_dask, uses_dask  # dask itself is imported only when used
from ._guard import fused_passes, guarded
from ._validate import _namespace, problem_iv
from .problem import BILSProblem
from .result import BILSResult, _to_host

__all__ = ["run_solver", "canonical_from_args"]


def canonical_from_args(R, Y, lo, hi, scale, offset):
    """Return (problem or None, canonical arrays) from a solver's positional arguments."""
    if isinstance(R, BILSProblem):
        if any(a is not None for a in (Y, lo, hi, scale, offset)):
            raise TypeError("when the first argument is a BILSProblem, `Y`, `lo`, `hi`, `scale` "
                            "and `offset` must not be given (they come from the problem)")
        if R.perm is not None and R.perm.ndim == 2:
            return R, None
        return R, R.canonical()
    if Y is None or lo is None or hi is None:
        raise TypeError("`R`, `Y`, `lo` and `hi` are required (or pass a BILSProblem)")
    return None, problem_iv(R, Y, lo, hi, scale, offset)


def _kernel_for(kernels, backend, solver):
    if backend not in kernels:
        raise NotImplementedError(f"`{solver}` has no {backend!r} backend yet; use backend='numpy'")
    return kernels[backend]()


def run_solver(solver, kernels, R, Y, lo, hi, scale, offset, backend, options):
    """Validate, dispatch to a backend kernel, and wrap the result.

    ``kernels`` maps a backend name to a zero-argument loader returning the kernel (so
    numba/cupy modules are imported only when used). ``options`` is a dict of kernel
    keyword options, or a callable ``options(can, cols, k_total)`` returning one for the
    canonical (sub)problem ``can`` holding RHS columns ``cols`` (a slice) of ``k_total``
    (for options that depend on the data, such as Klein's temperature and seeds).
    """
    if uses_dask(R, Y, lo, hi, scale, offset):  # dask right-hand sides: a lazy graph of chunk solves
        return run_solver_dask(solver, kernels, R, Y, lo, hi, scale, offset, backend, options)
    t0 = time.perf_counter()
    problem, can = canonical_from_args(R, Y, lo, hi, scale, offset)
    arrays = (problem.R,) if problem is not None else (R, Y)  # a problem's arrays may be on a device
    be = resolve_backend(backend, *arrays)
    kernel = guarded(solver, _kernel_for(kernels, be, solver))
    k_total = problem.k if problem is not None else can.k
    opts = options if callable(options) else (lambda c, cols, kt: options)

    if problem is not None and can is None:  # per-RHS orderings: one sub-problem per column
        n, k = problem.n, problem.k
        x = np.empty((n, k), dtype=np.int64)
        cost = np.empty(k)
        status = np.empty(k, dtype=np.int8)
        infos = []
        best_x = best_cost = None
        for j in range(k):
            Rj, yj, loj, hij, sj, oj, p = problem.rhs_subproblem(j)
            cj = problem_iv(Rj, yj[:, None], loj[:, None], hij[:, None], sj[:, None], oj[:, None])
            xj, cj_cost, stj, info = _host(kernel(cj, **opts(cj, slice(j, j + 1), k_total)))
            x[p, j] = xj[:, 0]
            cost[j], status[j] = cj_cost[0], stj[0]
            if "best_x" in info:
                if best_x is None:
                    m = info["best_x"].shape[0]
                    best_x = np.empty((m, n, k), dtype=np.int64)
                    best_cost = np.empty((m, k))
                best_x[:, p, j] = info.pop("best_x")[:, :, 0]
                best_cost[:, j] = info.pop("best_cost")[:, 0]
            infos.append(info)
        info = _merge_infos(infos)
        if best_x is not None:
            info.update(best_x=best_x, best_cost=best_cost)
    else:
        out = kernel(can, **opts(can, slice(0, k_total), k_total))
        # results in the inputs' namespace: numpy inputs on the cupy backend come back
        x, cost, status, info = _host(out) if be == "cupy" and can.xp is np else out
        if problem is not None and problem.perm is not None:
            xp = _namespace(x)
            fused = fused_passes(x.size) if xp is np and x.ndim == 2 else None
            if fused is not None and x.flags.c_contiguous:
                x = fused.scatter_rows(x, problem.perm)  # rows copied in parallel
            else:
                perm = xp.asarray(problem.perm)
                xo = xp.empty_like(x)
                xo[perm] = x
                x = xo
            if "best_x" in info:
                bx = xp.empty_like(info["best_x"])
                bx[:, perm] = info["best_x"]
                info = dict(info, best_x=bx)
    if problem is not None:
        off = _namespace(cost).asarray(problem.cost_offset)
        cost = cost + off
        if "best_cost" in info:
            info = dict(info, best_cost=info["best_cost"] + off)
    squeeze = problem.squeeze if problem is not None else can.squeeze
    if squeeze:
        x, cost, status = x[:, 0], cost[0], status[0]
        if "best_x" in info:
            info = dict(info, best_x=info["best_x"][:, :, 0], best_cost=info["best_cost"][:, 0])
    info = dict(info, time=time.perf_counter() - t0)
    return BILSResult(x=x, cost=_as_array(cost), status=_as_array(status), backend=be,
                      solver=solver, info=info)


def _host(out):
    """A kernel's ``(x, cost, status, info)`` with device arrays copied to the host (for
    host inputs, and the per-RHS orderings of a BILSProblem, assembled in numpy)."""
    x, cost, status, info = out
    h = lambda a: np.asarray(_to_host(a))  # noqa: E731
    return h(x), h(cost), h(status), {k: h(v) if hasattr(v, "shape") else v
                                      for k, v in info.items()}


def _as_array(a):
    """``a`` as an array of its own namespace (CuPy results stay on the device)."""
    return a if type(a).__module__.startswith("cupy") else np.asarray(a)


def _merge_infos(infos):
    out = {}
    for key in infos[0]:
        vals = [inf[key] for inf in infos]
        if isinstance(vals[0], np.ndarray):
            out[key] = np.concatenate([np.atleast_1d(v) if v.ndim < 2 else v for v in vals], axis=-1)
        elif isinstance(vals[0], (int, float, np.integer, np.floating)) and key in ("nodes",):
            out[key] = sum(vals)
        else:
            out[key] = vals[0]
    return out

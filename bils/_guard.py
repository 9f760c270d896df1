r"""Guards against silent wrong results: derived-quantity ranges, safe bound casts,
scratch-memory and work estimates, and output checks.

Input validation (:mod:`bils._validate`) checks each argument on its own; the checks here
look at what the solvers *compute from* the arguments, so that no input that passes them
can produce a NaN or infinite cost, a code outside the box, or an allocation or loop far
beyond what the machine can do.

Safe range
----------
Every sequential solver works with the level weights :math:`d_{ij} = R_{ii} s_{ij}`, the
centres :math:`c_i = t_i / d_i` and the residuals :math:`e_i = t_i - d_i x_i`. With the
bound

.. math::

    B_j = \max_i |Y_{ij}| + \max_i \sum_l |R_{il}|
          \cdot \max_l \big(|s_{lj}| \max(|lo_{lj}|, |hi_{lj}|) + |o_{lj}|\big)

every partial target :math:`t_i` and every residual of a box point is at most
:math:`2 B_j` in magnitude. :func:`level_weights_iv` requires, for the working dtype with
``tiny`` and ``max`` from :class:`numpy.finfo`,

.. math::

    \sqrt{\text{tiny}} \le |d_{ij}| \le \sqrt{\text{max}}, \qquad
    2 \sqrt{n}\, B_j \le \sqrt{\text{max}},

so that :math:`d^2` is a normal number, every cost (at most :math:`4 n B_j^2`) is finite,
and every centre (at most :math:`B_j / \sqrt{\text{tiny}} < \text{max}`) is finite.
Inputs outside this range are rejected with a :class:`ValueError` naming the argument.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ._grid import GroupedGrid

__all__ = [
    "BOUND_LIMIT",
    "bounds_iv",
    "level_weights_iv",
    "Magnitudes",
    "magnitudes",
    "array_magnitudes",
    "fused_passes",
    "scratch_limit",
    "scratch_iv",
    "work_iv",
    "WORK_LIMIT",
    "check_output",
    "guarded",
    "is_symmetric",
    "spd_iv",
    "rhs_chunks",
    "chunked",
    "estimated",
]

#: Largest magnitude of a box bound, for every input dtype: codes stay exact in float64.
BOUND_LIMIT = 2**52

#: Largest estimated number of elementary operations per right-hand side a solver call
#: may plan (a minute or two of one core); beyond it the call is refused up front.
WORK_LIMIT = 10**11


def bounds_iv(name, b):
    """Cast a bound array (any real dtype) to int64 safely, or raise ``ValueError``.

    One rule for every dtype: integral values of magnitude at most ``2**52``
    (:data:`BOUND_LIMIT`). Unsigned and wide integers are compared before the cast, so
    ``np.uint64(2**64 - 1)`` is rejected rather than wrapped to ``-1``.

    Examples
    --------
    >>> import numpy as np
    >>> bounds_iv("hi", np.uint8(7)).tolist()
    7
    >>> bounds_iv("hi", np.uint64(2**64 - 1))
    Traceback (most recent call last):
        ...
    ValueError: `hi` must have magnitude <= 2**52
    """
    b = np.asarray(b)
    if b.size == 0:
        return b.astype(np.int64)
    kind = b.dtype.kind
    if kind == "f":
        if np.any(b != np.round(b)):
            raise ValueError(f"`{name}` must hold integers")
        bad = np.abs(b) > BOUND_LIMIT
    elif kind == "u":
        bad = b > np.asarray(BOUND_LIMIT, dtype=b.dtype) if b.dtype.itemsize >= 8 else np.zeros(b.shape, bool)
    elif kind == "i":
        bad = (b > BOUND_LIMIT) | (b < -BOUND_LIMIT) if b.dtype.itemsize >= 8 else np.zeros(b.shape, bool)
    else:  # pragma: no cover - callers pass real arrays
        raise TypeError(f"`{name}` must hold integers, got dtype {b.dtype}")
    if np.any(bad):
        raise ValueError(f"`{name}` must have magnitude <= 2**52")
    return b.astype(np.int64, copy=False)


def _compact(a):
    """A view of the broadcast view ``a`` without its repeated (zero-stride) axes."""
    a = np.asarray(a)
    index = tuple(slice(0, 1) if (st == 0 or sh == 1) else slice(None)
                  for st, sh in zip(a.strides, a.shape))
    return a[index]


def _max_row_abs_sum(R, rows=256):
    """``max_i sum_l |R_il|`` in slabs (no (n, n) temporary)."""
    out = 0.0
    for i0 in range(0, R.shape[0], rows):
        out = max(out, float(np.abs(R[i0:i0 + rows]).sum(axis=1).max()))
    return out


#: Arrays with at least this many entries are checked by the fused numba passes of
#: :mod:`bils._numba.passes` (one parallel read, no temporaries) when numba is
#: importable and JIT-compiled; smaller ones by numpy (the same rules and messages).
FUSED_MIN_SIZE = 1 << 16

_FUSED = []


def fused_passes(size):
    """The module of fused passes (:mod:`bils._numba.passes`) for an array of ``size`` entries, or None.

    None below :data:`FUSED_MIN_SIZE`, without numba, or under ``NUMBA_DISABLE_JIT=1``
    (interpreted loops over every entry would be slower than numpy's passes).
    """
    if size < FUSED_MIN_SIZE:
        return None
    if not _FUSED:
        try:
            import numba

            if numba.config.DISABLE_JIT:
                raise ImportError("numba JIT disabled")
            from ._numba import passes
        except ImportError:
            passes = None
        _FUSED.append(passes)
    return _FUSED[0]


@dataclasses.dataclass(frozen=True)
class Magnitudes:
    """Reductions of a problem's arrays that :func:`level_weights_iv` needs.

    ``O(n + g + k)`` numbers, computed once per validated problem (one fused pass per
    array for large ones), so the check for a second working precision reads nothing
    of size (n, k) again.

    Attributes
    ----------
    rowsum : float
        :math:`\\max_i \\sum_l |R_{il}|`.
    ymax : (k,) ndarray
        :math:`\\max_i |Y_{ij}|`.
    s_rowmin, s_rowmax : (g,) ndarray
        Per row of the scale values (a group, or a compact row): min and max of ``|s|``.
    s_colmax, o_colmax : (k or 1,) ndarray
        Per column: max of ``|s|`` and of ``|o|`` over the rows of their values.
    """

    rowsum: float
    ymax: np.ndarray
    s_rowmin: np.ndarray
    s_rowmax: np.ndarray
    s_colmax: np.ndarray
    o_colmax: np.ndarray


def grid_values(grid):
    """The values of a grid: a :class:`~bils.GroupedGrid`'s (g, k or 1), or a broadcast
    view's compact (n or 1, k or 1) rows."""
    return grid.values if isinstance(grid, GroupedGrid) else _compact(grid)


def array_magnitudes(V, rows=True):
    """``(non_finite, row |V| min, row |V| max, column |V| max)`` of a 2-D float array.

    One fused pass for large C-contiguous float64 arrays, numpy reductions otherwise
    (row parts None with ``rows=False``).
    """
    V = np.asarray(V)
    fused = fused_passes(V.size)
    if fused is not None and V.dtype == np.float64 and V.flags.c_contiguous and V.ndim == 2:
        return fused.array_stats(V, rows)
    non_finite = V.dtype.kind == "f" and not bool(np.all(np.isfinite(V)))
    if non_finite:
        return True, None, None, None
    cmax = _abs_range(V, axis=0, need_min=False)[1]
    if not rows:
        return False, None, None, cmax
    rmin, rmax = _abs_range(V, axis=1)
    return False, rmin, rmax, cmax


def magnitudes(R, Y, scale, offset, *, rowsum=None, ymax=None, s_stats=None, o_colmax=None):
    """:class:`Magnitudes` of a problem; parts already computed by validation are passed in."""
    if rowsum is None:
        rowsum = _max_row_abs_sum(R)
    if ymax is None:
        ymax = array_magnitudes(Y, rows=False)[3]
    if s_stats is None:
        s_stats = array_magnitudes(grid_values(scale))[1:]
    if o_colmax is None:
        o_colmax = array_magnitudes(grid_values(offset), rows=False)[3]
    return Magnitudes(rowsum, ymax, *s_stats, o_colmax)


def level_weights_iv(R, Y, lo, hi, scale, offset, dtype=np.float64, mags=None):
    """Check the level weights ``R_ii * scale_ij`` and the residual bound (see module doc).

    ``R`` (n, n), ``Y`` (n, k) float64; ``lo``, ``hi``, ``scale``, ``offset`` broadcast
    views of shape (n, k) (``scale``, ``offset`` may be :class:`~bils.GroupedGrid` s).
    ``dtype`` is the working precision (float64 or float32). ``mags`` (a
    :class:`Magnitudes` of these arrays) skips the reductions over ``R``, ``Y`` and the
    grids. Raises ``ValueError`` naming ``R``/``scale`` (weights) or
    ``Y``/``offset``/``lo``/``hi`` (residual bound). Cost: one pass over ``R``, ``Y`` and
    the grid values without ``mags``; ``O(n + k)`` with it.
    """
    if not isinstance(R, np.ndarray):  # device problems: checked by their kernels' outputs only
        return
    if mags is None:
        mags = magnitudes(R, Y, scale, offset)
    fi = np.finfo(dtype)
    tiny, big = math.sqrt(float(fi.tiny)), math.sqrt(float(fi.max))
    n = R.shape[0]
    name = np.dtype(dtype).name
    diag = np.abs(np.diag(R)).astype(np.float64)
    S = grid_values(scale)
    if isinstance(scale, GroupedGrid):  # reduce the group values, then map them to levels
        smin, smax = mags.s_rowmin[scale.groups], mags.s_rowmax[scale.groups]
    else:
        smin, smax = mags.s_rowmin, mags.s_rowmax  # per level, over RHS (compact rows)
    if dtype != np.float64:
        # the sweep casts R and scale themselves to `dtype`: each must stay a normal number
        for what, lo_v, hi_v in (("R", diag, diag), ("scale", smin, smax)):
            if np.any(lo_v < float(fi.tiny)) or np.any(hi_v > float(fi.max)):
                raise ValueError(f"`{what}` has entries outside the {name} range "
                                 f"[{float(fi.tiny):.3g}, {float(fi.max):.3g}] needed by "
                                 f"`precision`={name!r}; use precision='float64'")
    with np.errstate(over="ignore", under="ignore"):
        dmin, dmax = diag * smin, diag * smax
    bad = ~((dmin >= tiny) & (dmax <= big))
    if np.any(bad):
        i = int(np.argwhere(bad)[0, 0]) if bad.ndim else 0
        with np.errstate(over="ignore", under="ignore"):
            srow = scale.row(i) if isinstance(scale, GroupedGrid) else S[min(i, S.shape[0] - 1)]
            row = diag[i] * np.abs(srow)
        worst = row[~((row >= tiny) & (row <= big))][0]
        raise ValueError(
            f"the level weights `R[i, i] * scale[i, j]` must lie in [{tiny:.3g}, {big:.3g}] "
            f"(the {name} range where their squares stay normal); got "
            f"{float(worst):.3g} at level {i}: rescale `R` and `scale`")
    # residual bound B_j (an upper bound of the module doc's, from per-column maxima)
    k = Y.shape[1]
    lo_c, hi_c = _compact(lo), _compact(hi)
    M = np.maximum(np.max(np.abs(lo_c), axis=0), np.max(np.abs(hi_c), axis=0)).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        grid = mags.s_colmax * M + mags.o_colmax
        B = np.broadcast_to(mags.ymax + mags.rowsum * grid, (k,))
        lim = big / (2.0 * math.sqrt(n))
    bad = ~(B <= lim)
    if np.any(bad):
        j = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"the problem's magnitudes overflow {name}: `Y`, `R`, `scale`, "
            f"`offset` and the box (`lo`, `hi`) bound the residuals by {float(B[j]):.3g} for RHS {j}, "
            f"which must be <= {lim:.3g} for the costs to stay finite; rescale the problem")


def _abs_range(a, axis, need_min=True):
    """``(min |a|, max |a|)`` along ``axis`` (float64), by min/max reductions of ``a``.

    Only rows/columns holding both signs need ``|a|`` itself (rare: scales are positive);
    with ``need_min=False`` the minimum is not computed (returned as None).
    """
    a = np.asarray(a)
    amin = np.min(a, axis=axis).astype(np.float64)
    amax = np.max(a, axis=axis).astype(np.float64)
    absmax = np.maximum(amax, -amin)
    if not need_min:
        return None, absmax
    absmin = np.where(amin > 0, amin, -amax)
    mixed = (amin <= 0) & (amax >= 0)
    if np.any(mixed):
        absmin = np.where(mixed, np.min(np.abs(a), axis=axis), absmin)
    return absmin, absmax


def scratch_limit():
    """Bytes of scratch memory one solver call may plan for.

    Half the physical memory when known, else 8 GiB; the environment variable
    ``BILS_SCRATCH_LIMIT`` (bytes) overrides it.
    """
    env = os.environ.get("BILS_SCRATCH_LIMIT")
    if env:
        return int(float(env))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _gib(b):
    return f"{b / 2**30:.3g} GiB"


def scratch_iv(what, nbytes, hint):
    """Raise ``ValueError`` before allocating when ``nbytes`` exceeds :func:`scratch_limit`."""
    limit = scratch_limit()
    if nbytes > limit:
        raise ValueError(f"{what} needs about {_gib(nbytes)} of memory (limit {_gib(limit)}, "
                         f"set BILS_SCRATCH_LIMIT to change it): {hint}")


def work_iv(what, ops, hint):
    """Raise ``ValueError`` when the estimated operations per RHS exceed :data:`WORK_LIMIT`."""
    if ops > WORK_LIMIT:
        raise ValueError(f"{what} would take about {ops:.3g} operations per right-hand side "
                         f"(limit {WORK_LIMIT:.0e}): {hint}")


def rhs_chunks(k, ops_per_rhs, target=2e8, min_width=256):
    """Split ``range(k)`` into slices of about ``target`` estimated operations each.

    Kernels run one chunk at a time from a Python loop, so ``KeyboardInterrupt`` is
    honoured between chunks (a numba kernel cannot be interrupted while it runs). A chunk
    holds at least ``min_width`` right-hand sides, so the kernels' matrix products stay
    wide (kernels that loop over panels in Python, like K-best's, are interruptible
    between panels as well).
    """
    per = int(max(min_width, 1, min(k, target // max(1.0, float(ops_per_rhs)))))
    return [slice(j0, min(k, j0 + per)) for j0 in range(0, k, per)]


def check_output(solver, can, x, cost):
    """Refuse to return a non-finite cost or a code outside the box (a safety net).

    With inputs inside the safe range this never fires; if it does, the message says
    which RHS and that the problem must be rescaled.
    """
    if not isinstance(x, np.ndarray):  # device results: reductions on the device, flags to the host
        import cupy as xp
        if bool(xp.all(xp.isfinite(cost))) and bool(xp.all((x >= can.lo) & (x <= can.hi))):
            return
        x, cost = xp.asnumpy(x), xp.asnumpy(cost)
        can = dataclasses.replace(can, lo=xp.asnumpy(can.lo), hi=xp.asnumpy(can.hi))
    cost = np.asarray(cost)
    ok = np.isfinite(cost)
    if not np.all(ok):
        j = int(np.argwhere(~ok)[0, 0])
        raise ValueError(f"`{solver}` produced a non-finite cost ({cost[j]}) for RHS {j}: the "
                         f"problem is too badly scaled for floating point; rescale `R`, `Y` and `scale`")
    fused = fused_passes(x.size)
    if (fused is not None and x.dtype == np.int64 and x.ndim == 2 and x.flags.c_contiguous
            and fused.codes_in_box(x, *(np.ascontiguousarray(_compact(b), dtype=np.int64)
                                        for b in (can.lo, can.hi)))):
        return  # one parallel pass, no (n, k) temporaries; else numpy finds the culprit
    lo_c, hi_c = _compact(can.lo), _compact(can.hi)
    if x.ndim == 2 and x.size and lo_c.shape[-1] == 1 and hi_c.shape[-1] == 1:
        # bounds shared by all RHS (the usual case): per-level min and max of the codes,
        # no (n, k) temporaries; the elementwise test below only finds where it failed
        if np.all(x.min(axis=1, keepdims=True) >= lo_c) and np.all(x.max(axis=1, keepdims=True) <= hi_c):
            return
    inbox = (x >= can.lo) & (x <= can.hi)
    if not np.all(inbox):
        i, j = np.argwhere(~inbox)[0]
        raise ValueError(f"`{solver}` produced a code outside the box at level {int(i)}, RHS "
                         f"{int(j)}: the problem is too badly scaled for floating point")


def guarded(solver, kernel):
    """``kernel`` with its outputs checked by :func:`check_output` (finite costs, codes in the box)."""
    def run(can, **options):
        x, cost, status, info = kernel(can, **options)
        check_output(solver, can, x, cost)
        return x, cost, status, info

    return run


def is_symmetric(H, rows=512):
    """``|H - Hᵀ| <= 1e-10 |Hᵀ| + 1e-12 max(1, max|H|)`` elementwise, in slabs of rows."""
    atol = 1e-12 * max(1.0, float(np.abs(H).max()))
    for i0 in range(0, H.shape[0], rows):
        a = H[i0:i0 + rows]
        b = H[:, i0:i0 + rows].T
        if not np.all(np.abs(a - b) <= atol + 1e-10 * np.abs(b)):
            return False
    return True


def spd_iv(name, G, rule="positive definite"):
    """Check a finite real square ``G`` is symmetric and positive definite (Cholesky), or raise.

    The messages are "`name` must be symmetric" and "`name` must be " + ``rule``.
    """
    if not is_symmetric(G):
        raise ValueError(f"`{name}` must be symmetric")
    import scipy.linalg.lapack

    _, info = scipy.linalg.lapack.dpotrf(np.asarray(G, dtype=np.float64), lower=0, clean=0)
    if info != 0:
        raise ValueError(f"`{name}` must be {rule}")


def _take_cols(can, cols):
    """The canonical problem ``can`` restricted to the RHS columns ``cols`` (a slice)."""
    return dataclasses.replace(can, Y=can.Y[:, cols], lo=can.lo[:, cols], hi=can.hi[:, cols],
                               scale=_grid_cols(can.scale, cols), offset=_grid_cols(can.offset, cols))


def _grid_cols(grid, cols):
    """Columns ``cols`` of a grid (a :class:`~bils.GroupedGrid` or a broadcast view)."""
    return grid.cols(cols) if isinstance(grid, GroupedGrid) else grid[:, cols]


def estimated(kernel, ops_per_rhs):
    """``kernel`` preceded by ``ops_per_rhs(can, **options)`` (which raises before allocating)."""
    def run(can, **options):
        ops_per_rhs(can, **options)
        return kernel(can, **options)

    return run


def chunked(kernel, ops_per_rhs, target=2e8, min_width=256):
    """``kernel`` run over chunks of right-hand sides from a Python loop.

    ``ops_per_rhs(can)`` estimates the operations per RHS (and may raise ``ValueError``
    up front, before anything is allocated). Between chunks the interpreter runs, so
    Ctrl-C (``KeyboardInterrupt``) stops a long call within about one chunk's time.
    Outputs are concatenated along the RHS axis (info arrays whose last axis has the
    chunk's width too); the result equals one call on all columns.
    """
    def run(can, **options):
        ops = ops_per_rhs(can, **options)
        k = can.Y.shape[1]
        parts = rhs_chunks(k, ops, target, min_width)
        if len(parts) == 1:
            return kernel(can, **options)
        outs = [kernel(_take_cols(can, cols), **options) for cols in parts]
        x = np.concatenate([o[0] for o in outs], axis=1)
        cost = np.concatenate([o[1] for o in outs])
        status = np.concatenate([o[2] for o in outs])
        info = {}
        for key, v in outs[0][3].items():
            w0 = parts[0].stop - parts[0].start
            if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[-1] == w0:
                info[key] = np.concatenate([o[3][key] for o in outs], axis=-1)
            else:
                info[key] = v
        return x, cost, status, info

    return run

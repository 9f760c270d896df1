r"""K-best: breadth-first beam search over the nearest-plane tree."""

from __future__ import annotations

import math

import numpy as np

from ._driver import run_solver
from ._guard import _compact, chunked, scratch_iv, work_iv
from ._validate import int_iv
from .result import Status

__all__ = ["kbest"]

#: Levels per call of the numba kernel's panel loop (``bils._numba.kbest.PANEL``).
_PANEL_LEVELS = 512
#: RHS processed together by the numpy reference (bounds its scratch memory).
_CHUNK_ELEMS = 1 << 22
#: Estimated operations per call of a backend's kernel (``chunked``'s ``target``). The numba
#: kernel returns to Python between panels anyway (so Ctrl-C is honoured within a panel's
#: share) and bounds its path storage itself; each call copies ``R``'s panels and pays its
#: products' and page faults' overhead again: 4096 x 4096 3-bit K = 8 took ~1 CPU s more in
#: 8 calls (1e10) than in one.
_CHUNK_OPS = {"numba": 4e10}


def _kbest_numpy(can, *, beam_width, n_children):
    n, k = can.Y.shape
    x = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    width = int(np.max(can.hi - can.lo)) if k else 0
    ce = 2 * min(n_children - 1, width) + 1  # candidates per beam member (zig-zag window)
    chunk = max(1, _CHUNK_ELEMS // max(1, beam_width * max(n, ce)))
    for j0 in range(0, k, chunk):
        cols = slice(j0, min(k, j0 + chunk))
        x[:, cols], cost[cols] = _kbest_chunk(can, cols, beam_width, n_children)
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return x, cost, status, {"beam_width": beam_width, "n_children": n_children}


def _kbest_chunk(can, cols, K, C):
    R = can.R
    Y = can.Y[:, cols] - can.offset.cols(cols).premultiply(R)
    S = can.scale.cols(cols)  # GroupedGrid: row i is S.row(i), shape (kc or 1,)
    lo = np.asarray(can.lo[:, cols], dtype=np.float64)
    hi = np.asarray(can.hi[:, cols], dtype=np.float64)
    n, kc = Y.shape
    cidx = np.arange(kc)
    # beams: decided values z = S * x of levels > i, codes, partial costs; slot 0 = Babai path
    Z = np.zeros((kc, 1, n))
    X = np.zeros((kc, 1, n), dtype=np.int64)
    pc = np.zeros((kc, 1))
    babai_slot = np.zeros(kc, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        B = Z.shape[1]
        t = Y[i][:, None] - Z[:, :, i + 1:] @ R[i, i + 1:]  # (kc, B)
        d = (R[i, i] * S.row(i))[:, None]
        c = t / d
        m = np.clip(np.floor(c + 0.5), lo[i][:, None], hi[i][:, None])
        w = int(min(C - 1, np.max(hi[i] - lo[i]))) if kc else 0
        # zig-zag offsets 0, -1, +1, -2, +2, ...: with the stable sort below the rounded
        # value comes first on exact ties, so child 0 is always the Babai decision
        offs = np.zeros(2 * w + 1)
        offs[1::2] = -np.arange(1, w + 1)
        offs[2::2] = np.arange(1, w + 1)
        z = m[:, :, None] + offs  # (kc, B, 2w+1)
        inbox = (z >= lo[i][:, None, None]) & (z <= hi[i][:, None, None])
        dist = np.where(inbox, np.abs(c[:, :, None] - z), np.inf)
        order = np.argsort(dist, axis=2, kind="stable")[:, :, :C]
        z = np.take_along_axis(z, order, axis=2)
        ok = np.take_along_axis(inbox, order, axis=2)
        Ce = z.shape[2]  # children per parent at this level (box may be narrower than C)
        e = t[:, :, None] - d[:, :, None] * z
        cc = np.where(ok, pc[:, :, None] + e * e, np.inf).reshape(kc, -1)  # (kc, B*C)
        nb = min(K, cc.shape[1])
        keep = np.argsort(cc, axis=1, kind="stable")[:, :nb]
        # keep the Babai child of the Babai parent (candidate index babai_slot*Ce + 0);
        # slots without a feasible child keep cost inf and never win
        bchild = babai_slot * Ce
        present = np.any(keep == bchild[:, None], axis=1)
        keep[~present, -1] = bchild[~present]
        parent, child = keep // Ce, keep % Ce
        newZ = Z[cidx[:, None], parent]
        newX = X[cidx[:, None], parent]
        zi = z[cidx[:, None], parent, child]
        newX[:, :, i] = zi.astype(np.int64)
        newZ[:, :, i] = zi * S.row(i)[:, None]
        Z, X = newZ, newX
        pc = np.take_along_axis(cc, keep, axis=1)
        babai_slot = np.argmax(keep == bchild[:, None], axis=1)
    best = np.argmin(pc, axis=1)
    return X[cidx, best].T, pc[cidx, best]


def _kbest_numba():
    from ._numba.kbest import kbest_kernel

    return kbest_kernel


def _kbest_cupy():
    from ._cuda.kbest import kbest_kernel

    return kbest_kernel


KERNELS = {"numpy": lambda: _kbest_numpy, "numba": _kbest_numba, "cupy": _kbest_cupy}


def kbest(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None, beam_width=8,
          n_children=None, backend="auto"):
    r"""K-best breadth-first search: a beam of ``beam_width`` partial solutions per RHS.

    Levels are decided from ``n - 1`` down to ``0``. Every survivor is expanded into its
    ``n_children`` nearest box integers around its centre :math:`c_i` (zig-zag order:
    increasing :math:`|c_i - z|`), each child scored by the accumulated partial cost

    .. math::

        \sum_{l \ge i} (t_l - R_{ll} s_l z_l)^2,

    and the ``beam_width`` cheapest children survive. The Babai path (nearest child of
    the Babai parent) is always kept, so the result is never worse than :func:`babai`,
    and ``beam_width=1`` *is* Babai.

    Parameters
    ----------
    R, Y, lo, hi, scale, offset
        As in :func:`bils.babai` (or a :class:`~bils.BILSProblem` first).
    beam_width : int, default 8
        Survivors per level ``K``.
    n_children : int, optional
        Children per survivor; default ``beam_width`` (then the beam holds exactly the
        ``K`` best extensions of the previous beam). Capped at the box size.
    backend : {"auto", "numpy", "numba", "cupy"}

    Returns
    -------
    BILSResult

    Notes
    -----
    :math:`O(K n^2 k)` flops and :math:`O(K C \log(KC))` selection work per level and
    RHS. Ties in the selection go to the earlier parent, then the nearer child.

    Memory and work are estimated before anything is allocated: a beam whose scratch
    exceeds half the physical memory (``BILS_SCRATCH_LIMIT`` bytes overrides it) or whose
    work exceeds about 1e11 operations per RHS raises ``ValueError``
    with the estimate. Right-hand sides run in chunks from a Python loop, so Ctrl-C is
    honoured between chunks.

    References
    ----------
    .. [1] K. Wong, C. Tsui, R. Cheng, W. Mow, "A VLSI architecture of a K-best lattice
       decoding algorithm for MIMO channels", ISCAS 2002.

    Examples
    --------
    >>> import numpy as np, bils
    >>> rng = np.random.default_rng(0)
    >>> R = np.triu(rng.standard_normal((8, 8))) + 2 * np.eye(8)
    >>> Y = rng.standard_normal((8, 5)) * 4
    >>> kb = bils.kbest(R, Y, -4, 4, beam_width=4, backend="numpy")
    >>> bool(np.all(kb.cost <= bils.babai(R, Y, -4, 4, backend="numpy").cost + 1e-12))
    True
    """
    beam_width = int_iv("beam_width", beam_width, minimum=1)
    n_children = int_iv("n_children", n_children, minimum=1, allow_none=True)
    C = beam_width if n_children is None else n_children
    kernels = {be: (lambda f=f, t=_CHUNK_OPS.get(be, 1e10): chunked(f(), _kbest_ops, target=t))
               for be, f in KERNELS.items()}
    return run_solver("kbest", kernels, R, Y, lo, hi, scale, offset, backend,
                      {"beam_width": beam_width, "n_children": C})


def _kbest_ops(can, *, beam_width, n_children):
    """Operations per RHS of a K-best call; refuses, before allocating, what cannot fit.

    Memory per RHS (numpy reference, the larger of the two backends): the beams
    ``4 * 8 K n`` bytes and the candidates ``56 K (2w + 1)`` bytes, ``w`` the zig-zag
    half-width ``min(C - 1, max(hi - lo))``. Work per RHS: ``n K (n + (2w+1) log2(K (2w+1)))``.
    """
    n = can.R.shape[0]
    K, C = beam_width, n_children
    width = int(np.max(_compact_hi_lo(can))) if can.Y.shape[1] else 0
    w = min(C - 1, width)
    ce = 2 * w + 1
    hint = "lower `beam_width` or `n_children`"
    scratch_iv(f"`kbest` with `beam_width`={K}, `n_children`={C} and n={n}",
               K * (32 * n + 56 * ce), hint)
    ops = n * K * (n + ce * math.log2(K * ce + 2))
    work_iv(f"`kbest` with `beam_width`={K}, `n_children`={C} and n={n}", ops, hint)
    # both kernels return to Python between panels of levels (numba: 512 levels; numpy:
    # every level), so the uninterrupted unit of work is one panel's share
    return ops * min(1.0, _PANEL_LEVELS / n)


def _compact_hi_lo(can):
    """``hi - lo`` without materialising repeated (broadcast) axes."""
    return _compact(can.hi) - _compact(can.lo)

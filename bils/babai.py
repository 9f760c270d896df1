r"""Box Babai / nearest plane (GPTQ is exactly this)."""

from __future__ import annotations

import numpy as np

from ._driver import run_solver
from ._guard import level_weights_iv
from ._validate import choice_iv, int_iv
from .result import Status

__all__ = ["babai"]


def nearest_plane_sweep(can, block_size, decide):
    """Blocked nearest-plane sweep shared by Babai and Klein (numpy reference).

    Coordinates are decided from ``n - 1`` down to ``0``. Inside a block of
    ``block_size`` columns each level is a vector operation over the RHS; the update of
    every level before the block is one matrix product ("lazy batch", as in GPTQ).

    ``decide(i, c, d)`` returns the integer (as float) chosen at level ``i`` for centres
    ``c`` (k,) whose level weights are ``d = R_ii * S_i`` (k,).

    Returns ``x`` (n, k) int64 and ``cost`` (k,).
    """
    R, S = can.R, can.scale  # S: GroupedGrid, row i is S.row(i)
    n, k = can.Y.shape
    dtype = R.dtype  # float64, or float32 for precision="float32"
    Yr = can.Y - can.offset.premultiply(R)  # residual target after the offset
    Z = np.zeros((n, k), dtype=dtype)  # S * x of decided levels
    x = np.empty((n, k), dtype=np.int64)
    cost = np.zeros(k)
    for b_end in range(n, 0, -block_size):
        a = max(0, b_end - block_size)
        for i in range(b_end - 1, a - 1, -1):
            t = Yr[i] - R[i, i + 1:b_end] @ Z[i + 1:b_end]
            s = S.row(i)
            d = R[i, i] * s
            xi = decide(i, t / d, d)
            x[i] = xi
            Z[i] = s * xi
            e = t - d * xi
            cost += e * e
        if a:
            Yr[:a] -= R[:a, a:b_end] @ Z[a:b_end]
    return x, cost


def box_round(c, lo, hi):
    """The tie rule used everywhere: ``clip(floor(c + 0.5), lo, hi)``."""
    return np.clip(np.floor(c + 0.5), lo, hi)


def _babai_numpy(can, *, block_size, precision="float64"):
    lo, hi = can.lo, can.hi
    if precision != "float64":
        can = can.astype(np.dtype(precision))
    x, cost = nearest_plane_sweep(can, block_size, lambda i, c, d: box_round(c, lo[i], hi[i]))
    status = np.full(can.k, Status.HEURISTIC, dtype=np.int8)
    return x, np.asarray(cost, dtype=np.float64), status, {"block_size": block_size,
                                                            "precision": precision}


def _babai_numba():
    from ._numba.babai import babai_kernel

    return babai_kernel


def _babai_cupy():
    from ._cuda.babai import babai_kernel

    return babai_kernel


KERNELS = {"numpy": lambda: _babai_numpy, "numba": _babai_numba, "cupy": _babai_cupy}


#: Working precisions of :func:`babai`.
PRECISIONS = ("float64", "float32")


def babai(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None, block_size=128,
          precision="float64", backend="auto"):
    r"""Box-constrained Babai (nearest-plane) point for many right-hand sides.

    Solves approximately, for each column ``j``,

    .. math::

        \min_{x \in \mathbb{Z}^n,\; lo \le x \le hi}
        \lVert y_j - R\,(s_j \circ x + o_j) \rVert_2^2

    by deciding coordinates from ``i = n-1`` down to ``0``:

    .. math::

        c_i = \frac{(y_i - R_{i,:} o) - \sum_{l>i} R_{il} s_l x_l}{R_{ii} s_i},
        \qquad x_i = \mathrm{clip}(\lfloor c_i + \tfrac12 \rfloor, lo_i, hi_i).

    Parameters
    ----------
    R : (n, n) array_like or BILSProblem
        Upper-triangular factor with a non-zero diagonal, shared by all RHS; or a
        :class:`~bils.BILSProblem` (then ``Y``, ``lo``, ``hi``, ``scale``, ``offset``
        come from it and ``x`` is returned in its original coordinate order).
    Y : (n,) or (n, k) array_like
        Right-hand sides, one per column. A ``dask.array`` (chunked along the columns)
        gives a lazy result: ``x``, ``cost`` and ``status`` are dask arrays with the same
        column chunks, one solve task per chunk, equal to the in-memory solve for any
        chunking (see the "Scaling out" guide and :meth:`BILSResult.compute`).
    lo, hi : array_like of int
        Box bounds, broadcastable to ``Y.shape``; ``lo <= hi``.
    scale, offset : array_like or GroupedGrid, optional
        Grid ``s``, ``o`` broadcastable to ``Y.shape`` (default 1 and 0): the
        reconstructed point is ``s * x + o``. A :class:`~bils.GroupedGrid` gives one
        value per (group of coordinates, RHS) and a group map; kernels read it through
        the map, so group-wise quantization grids cost ``g k`` numbers, not ``n k``.
    block_size : int, default 128
        Columns per block. Inside a block levels are processed one by one; the
        update of all earlier levels is one matrix product. The result does not
        depend on it (up to floating-point rounding).
    precision : {"float64", "float32"}, default "float64"
        Working precision of the sweep. ``"float32"`` (GPTQ's precision) runs the
        products and updates in single precision: about twice as fast on CPUs and half
        the memory traffic; codes equal the float64 ones except where single-precision
        rounding moves a centre :math:`c_i` across a rounding boundary, and ``cost`` is
        summed in float64 from single-precision residuals (relative error ~1e-6).
    backend : {"auto", "numpy", "numba", "cupy"}
        See :func:`bils.resolve_backend`.

    Returns
    -------
    BILSResult
        ``x`` (n, k) int64, ``cost`` (k,), ``status`` all ``HEURISTIC``.

    Raises
    ------
    ValueError
        When an argument breaks its rule (the message names it), or when the problem
        leaves the floating-point safe range of the working precision: level weights
        :math:`|R_{ii} s_{ij}|` outside :math:`[\sqrt{\text{tiny}}, \sqrt{\text{max}}]`
        or magnitudes of ``Y``, ``R``, ``scale``, ``offset`` and the box that could make
        a cost overflow. No input returns a NaN or infinite cost or a code outside the
        box; every solver and backend raises the same error for the same input.

    See Also
    --------
    klein : randomised nearest plane, never worse than Babai.
    kbest : breadth-first beam, never worse than Babai.
    enumerate : exact Schnorr–Euchner search.

    Notes
    -----
    Cost :math:`O(n^2 k)` flops; with blocking, all but :math:`O(n\,b\,k)` of them
    are in one matrix product per block. Ties go up (``floor(c + 0.5)``).

    Run on ``H = R^T R`` with targets ``Y = R w`` and coordinates in reverse GPTQ
    order, Babai is exactly the GPTQ loop (Chen et al. 2025; Birnick 2025). Without
    clipping its cost is at most :math:`\tfrac14 \sum_i (R_{ii} s_i)^2`.

    References
    ----------
    .. [1] L. Babai, "On Lovász' lattice reduction and the nearest lattice point
       problem", Combinatorica 6 (1986).
    .. [2] J. Chen et al., "The geometry of LLM quantization: GPTQ as Babai's
       nearest plane algorithm", arXiv:2507.18553 (2025).

    Examples
    --------
    >>> import numpy as np, bils
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> res = bils.babai(R, R @ [1.2, 2.9], 0, 3, backend="numpy")
    >>> res.x.tolist(), round(float(res.cost), 4)
    ([1, 3], 0.1)
    """
    block_size = int_iv("block_size", block_size, minimum=1)
    precision = choice_iv("precision", precision, PRECISIONS)
    opts = {"block_size": block_size, "precision": precision}
    if precision != "float64":
        def options(can, cols, k_total):
            _precision_iv(can, precision)
            return opts
    return run_solver("babai", KERNELS, R, Y, lo, hi, scale, offset, backend,
                      opts if precision == "float64" else options)


def _precision_iv(can, precision):
    """The problem's level weights and residual bound in the working precision's range."""
    level_weights_iv(can.R, can.Y, can.lo, can.hi, can.scale, can.offset, np.dtype(precision),
                     mags=getattr(can, "magnitudes", None))  # validation's reductions, reused

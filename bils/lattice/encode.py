r"""Encoding onto a lattice codebook under a metric (:func:`encode`) and decoding (:func:`decode`).

Encoding under :math:`M = C^T C` is the BILS :math:`\min_z \lVert C v - C (I_m \otimes G)(z + o)\rVert^2`;
one QR per diagonal block of :math:`C (I_m \otimes G)` makes its basis upper triangular, and the
solvers of :mod:`bils` apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .._backend import resolve_backend
from .._validate import _real_array, choice_iv, int_iv, problem_iv
from ..babai import babai
from ..enumeration import enumerate as _enumerate
from ..kbest import kbest
from ..result import BILSResult, Status
from .codebook import check_codebook, check_vectors, metric_factor
from .compander import compand, expand

__all__ = ["ENCODE_METHODS", "encode", "decode"]

#: Encoding methods of :func:`encode`.
ENCODE_METHODS = ("round_off", "nearest_plane", "kbest", "exact")


# ---------------------------------------------------------------------------- the BILS
@dataclass(frozen=True)
class _Lattice:
    """The BILS of an encoding: ``min ||Y - R (z + o)||²`` over the tiled box."""

    R: np.ndarray  # (n, n) upper triangular, positive diagonal
    Y: np.ndarray  # (n, N)
    lo: np.ndarray  # (n, 1) int64
    hi: np.ndarray
    offset: np.ndarray  # (n, 1)
    d: int


def _build(codebook, V, C):
    """QR of the block upper-triangular basis ``C (I ⊗ G)``, one diagonal block at a time."""
    d = codebook.d
    n = V.shape[0]
    m = n // d
    B = np.zeros((n, n))
    for s in range(m):
        sl = slice(s * d, (s + 1) * d)
        B[:, sl] = C[:, sl] @ codebook.G  # C is upper triangular: rows below block s vanish
    CV = C @ V
    R = np.zeros((n, n))
    Y = np.empty_like(CV)
    for s in range(m):
        sl = slice(s * d, (s + 1) * d)
        Q, Rs = np.linalg.qr(B[sl, sl])
        sign = np.where(np.diag(Rs) < 0, -1.0, 1.0)
        Q = Q * sign
        R[sl, sl] = np.triu(sign[:, None] * Rs)
        R[sl, (s + 1) * d:] = Q.T @ B[sl, (s + 1) * d:]
        Y[sl] = Q.T @ CV[sl]
    tile = lambda a: np.tile(a, m)[:, None]  # noqa: E731
    return _Lattice(R, Y, tile(codebook.lo), tile(codebook.hi), tile(codebook.offset), d)


def _cost(lat, Z):
    r = lat.Y - lat.R @ (Z + lat.offset)
    return np.einsum("ij,ij->j", r, r)


def _round_off(lat):
    """Block round-off: per sub-vector (last first) ``clip(round(R_ss^{-1} t - o))``."""
    n, N = lat.Y.shape
    d = lat.d
    Z = np.empty((n, N), dtype=np.int64)
    Zo = np.zeros((n, N))  # z + o of decided blocks
    for a in range(n - d, -1, -d):
        sl = slice(a, a + d)
        t = lat.Y[sl] - lat.R[sl, a + d:] @ Zo[a + d:]
        u = scipy.linalg.solve_triangular(lat.R[sl, sl], t, lower=False) - lat.offset[sl]
        z = np.clip(np.floor(u + 0.5), lat.lo[sl], lat.hi[sl])
        Z[sl] = z
        Zo[sl] = z + lat.offset[sl]
    return Z


def _blockwise_exact(lat, max_nodes, backend):
    """Exact search per sub-vector, sub-vectors decided last to first (block nearest plane)."""
    n, N = lat.Y.shape
    d = lat.d
    Z = np.empty((n, N), dtype=np.int64)
    Zo = np.zeros((n, N))
    status = np.full(N, Status.OPTIMAL if n == d else Status.HEURISTIC, dtype=np.int8)
    nodes = np.zeros(N, dtype=np.int64)
    be = None
    for a in range(n - d, -1, -d):
        sl = slice(a, a + d)
        t = lat.Y[sl] - lat.R[sl, a + d:] @ Zo[a + d:]
        res = _enumerate(lat.R[sl, sl], t, lat.lo[sl], lat.hi[sl], offset=lat.offset[sl],
                         max_nodes=max_nodes, backend=backend)
        be = res.backend
        Z[sl] = res.x
        Zo[sl] = res.x + lat.offset[sl]
        nodes += np.asarray(res.info["nodes"])
        status[res.status == Status.BUDGET_EXHAUSTED] = Status.BUDGET_EXHAUSTED
    return Z, status, {"nodes": nodes}, be


# ---------------------------------------------------------------------------- encode
def encode(codebook, V, metric=None, *, method="nearest_plane", beam_width=8, max_nodes=None,
           backend="auto"):
    r"""Encode vectors onto a lattice codebook under a metric.

    For each column :math:`v` of ``V`` (length :math:`n = m d`: :math:`m` sub-vectors
    sharing the generator) find codes :math:`z` in the box approximately minimising

    .. math::

        (v - \hat v)^T M (v - \hat v), \qquad
        \hat v = (I_m \otimes G)(z + o),\quad lo \le z \le hi .

    With :math:`M = C^T C` (upper Cholesky) and one QR per diagonal block,
    :math:`C (I_m \otimes G) = Q R` with :math:`R` upper triangular, so this is the BILS
    :math:`\min \lVert Q^T C v - R (z + o)\rVert^2` of :func:`bils.babai`. With a
    compander the whole computation runs on :math:`\mathrm{compand}(v)` (the metric is
    applied in the companded domain).

    Parameters
    ----------
    codebook : Codebook
    V : (n,) or (n, N) array_like
        Vectors, one per column; ``n`` a multiple of ``codebook.d``.
    metric : (n, n) array_like, optional
        Symmetric positive-definite :math:`M` shared by all columns (default identity),
        e.g. a diagonal block of a layer Hessian.
    method : {"nearest_plane", "round_off", "kbest", "exact"}
        ``"round_off"``: GLVQ's "Babai rounding",
        :math:`z_s = \mathrm{clip}(\lfloor R_{ss}^{-1} t_s - o + \tfrac12 \rfloor)` per
        sub-vector, sub-vectors decided last to first with the residual of the decided
        ones fed back into :math:`t_s` (plain :math:`\mathrm{clip}(\mathrm{round}(G^{-1}v - o))`
        when :math:`n = d` and :math:`M = I`). ``"nearest_plane"``: :func:`bils.babai`
        over all :math:`n` coordinates. ``"kbest"``: :func:`bils.kbest` over all
        :math:`n` coordinates. ``"exact"``: :func:`bils.enumerate` per sub-vector, decided
        last to first like round-off: the exact box-constrained closest point when
        :math:`n = d`.
    beam_width : int, default 8
        ``"kbest"`` only.
    max_nodes : int, optional
        ``"exact"`` only: node budget per sub-vector.
    backend : {"auto", "numpy", "numba", "cupy"}
        Passed to the solver (``"round_off"`` is numpy). With ``"cupy"`` (picked by
        ``"auto"`` for ``V`` on a GPU) every method runs on the device and the result
        holds CuPy arrays.

    Returns
    -------
    BILSResult
        ``x``: codes (n, N) int64 (``(n,)`` for a 1-D ``V``); ``cost``: the metric
        distance :math:`(v - \hat v)^T M (v - \hat v)` per column (in the companded
        domain when companding); ``status``: ``OPTIMAL`` for ``"exact"`` with
        :math:`n = d` (unless ``max_nodes`` stopped it), else ``HEURISTIC``;
        ``solver``: ``"lattice/<method>"``.

    See Also
    --------
    decode, fit_generator, bils.babai, bils.kbest, bils.enumerate

    Notes
    -----
    Guarantees (per column, for :math:`n = d`): ``exact`` ≤ every other method;
    ``kbest`` ≤ ``nearest_plane`` (the Babai path stays in the beam). ``nearest_plane``
    is **not** pointwise better than ``round_off``: for a vector uniformly distributed
    modulo the lattice (and far from the box faces) the expected costs are
    :math:`\tfrac1{12}\sum_i R_{ii}^2` (nearest plane) and
    :math:`\tfrac1{12}\sum_{i\le j} R_{ij}^2 = \tfrac1{12}\lVert C G\rVert_F^2`
    (round-off), so nearest plane wins on average by the off-diagonal mass of
    :math:`R`, but single vectors exist where round-off is closer. For :math:`n > d`,
    ``exact`` and ``round_off`` are block nearest-plane schemes (like GPTQ on vectors)
    and are not globally optimal.

    Costs: ``round_off`` and ``nearest_plane`` are :math:`O(n^2 N)`; ``kbest``
    :math:`O(K n^2 N)`; ``exact`` exponential in :math:`d` in the worst case, fast for
    :math:`d \le 16` and small boxes. Ties round up (:math:`\lfloor c + \tfrac12\rfloor`).

    References
    ----------
    .. [1] L. Babai, "On Lovász' lattice reduction and the nearest lattice point
       problem", Combinatorica 6 (1986).
    .. [2] C. P. Schnorr, M. Euchner, Math. Programming 66 (1994).
    .. [3] "GLVQ: Grouped lattice vector quantization for LLMs", arXiv:2510.20984 (2025).

    Examples
    --------
    >>> import numpy as np, bils
    >>> cb = bils.Codebook([[1.0, 0.9], [0.0, 0.3]], bits=2, offset=0)
    >>> v = np.array([1.2, 0.2])
    >>> for m in ("round_off", "nearest_plane", "exact"):
    ...     r = bils.lattice.encode(cb, v, method=m, backend="numpy")
    ...     print(m, r.x.tolist(), round(float(r.cost), 4))
    round_off [1, 1] 0.5
    nearest_plane [0, 1] 0.1
    exact [1, 0] 0.08
    >>> bils.lattice.decode(cb, [1, 0]).tolist()
    [1.0, 0.0]
    """
    if resolve_backend(backend, V) == "cupy":  # device encoders: bils._cuda.lattice
        from .._cuda.lattice import encode as encode_cuda

        return encode_cuda(codebook, V, metric, method=method, beam_width=beam_width,
                           max_nodes=max_nodes)
    codebook = check_codebook(codebook)
    V, squeeze = check_vectors("V", V, codebook.d)
    method = choice_iv("method", method, ENCODE_METHODS)
    beam_width = int_iv("beam_width", beam_width, minimum=1)
    max_nodes = int_iv("max_nodes", max_nodes, minimum=1, allow_none=True)
    C = metric_factor(metric, V.shape[0])
    if codebook.companded:
        V = compand(V, codebook.mu, codebook.amax)
    return encode_prepared(codebook, V, C, method, beam_width, max_nodes, backend, squeeze)


def _lattice_range_iv(lat):
    """The encoding BILS must be in the solvers' safe range (finite costs for every method)."""
    try:
        with np.errstate(all="ignore"):
            problem_iv(lat.R, lat.Y, lat.lo, lat.hi, None, lat.offset)
    except ValueError as exc:
        raise ValueError("the encoding problem built from `codebook.G`, `V` and `metric` is out of "
                         f"floating-point range: {exc}") from None


def encode_prepared(codebook, V, C, method, beam_width, max_nodes, backend, squeeze=False):
    """:func:`encode` (also used by the fitting) on validated (and companded) ``V`` and metric factor ``C``."""
    if backend != "auto" and resolve_backend(backend, V) == "cupy":  # fit_generator on a GPU
        from .._cuda.lattice import encode_factor

        return encode_factor(codebook, V, C, method, beam_width, max_nodes, squeeze, host=True)
    lat = _build(codebook, V, C)
    _lattice_range_iv(lat)
    N = V.shape[1]
    info = {}
    if method == "round_off":
        resolve_backend(backend, V)  # validates the name; round-off itself is numpy
        Z = _round_off(lat)
        status = np.full(N, Status.HEURISTIC, dtype=np.int8)
        be = "numpy"
    elif method == "exact":
        Z, status, info, be = _blockwise_exact(lat, max_nodes, backend)
    else:
        args = (lat.R, lat.Y, lat.lo, lat.hi)
        if method == "nearest_plane":
            res = babai(*args, offset=lat.offset, backend=backend)
        else:
            res = kbest(*args, offset=lat.offset, beam_width=beam_width, backend=backend)
            info = {"beam_width": beam_width}
        Z, status, be = np.asarray(res.x), np.asarray(res.status), res.backend
    cost = _cost(lat, Z) if method in ("round_off", "exact") else np.asarray(res.cost)
    if squeeze:
        Z, cost, status = Z[:, 0], cost[0], status[0]
    return BILSResult(x=Z, cost=np.asarray(cost), status=np.asarray(status), backend=be,
                      solver=f"lattice/{method}", info=info)


def decode(codebook, Z):
    r"""Reproduction vectors :math:`\hat v = (I_m \otimes G)(z + o)` (expanded if companded).

    Parameters
    ----------
    codebook : Codebook
    Z : (n,) or (n, N) array_like of int
        Codes, ``n`` a multiple of ``codebook.d``, inside the box.

    Returns
    -------
    (n,) or (n, N) ndarray of float64

    Examples
    --------
    >>> import numpy as np, bils
    >>> cb = bils.Codebook([[2.0, 1.0], [0.0, 1.0]], bits=2)
    >>> bils.lattice.decode(cb, [[0, -2], [1, 1]]).tolist()
    [[2.5, -1.5], [1.5, 1.5]]
    """
    codebook = check_codebook(codebook)
    Z = _real_array("Z", Z)
    if Z.dtype.kind == "f" and (not np.all(np.isfinite(Z)) or np.any(Z != np.round(Z))):
        raise ValueError("`Z` must hold integers")
    Zf, squeeze = check_vectors("Z", Z, codebook.d)
    d, (n, N) = codebook.d, Zf.shape
    lo, hi = np.tile(codebook.lo, n // d)[:, None], np.tile(codebook.hi, n // d)[:, None]
    if np.any(Zf < lo) or np.any(Zf > hi):
        raise ValueError("`Z` must lie inside the codebook box [lo, hi]")
    out = decode_prepared(codebook, Zf)
    return out[:, 0] if squeeze else out


def decode_prepared(codebook, Z):
    d = codebook.d
    n, N = Z.shape
    S = (Z.reshape(n // d, d, N) + codebook.offset[None, :, None])
    out = np.einsum("ij,mjk->mik", codebook.G, S).reshape(n, N)
    if codebook.companded:
        out = expand(out, codebook.mu, codebook.amax)
    return out

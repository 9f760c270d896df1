r"""Lattice vector quantization: encode onto a generator, decode, fit the generator.

A :class:`Codebook` is a generator :math:`G \in \mathbb{R}^{d\times d}` with a box of
:math:`2^b` integers per dimension and a code offset :math:`o`: the reproduction points are

.. math::

    \hat v = G\,(z + o), \qquad z \in \mathbb{Z}^d,\; lo \le z \le hi,

optionally through a µ-law compander (:func:`expand` applied to :math:`G(z+o)`).
A vector of length :math:`n = m d` is :math:`m` consecutive sub-vectors sharing
:math:`G`. Encoding under a metric :math:`M = C^T C` (SPD, e.g. a block of a layer
Hessian) is a small box-constrained integer least-squares problem

.. math::

    \min_{z} (v - \hat v)^T M (v - \hat v)
    = \lVert C v - C (I_m \otimes G)(z + o) \rVert_2^2,

whose basis :math:`C (I_m \otimes G)` is block upper triangular; one QR per diagonal block
makes it upper triangular, and the solvers of :mod:`bils` apply unchanged (GLVQ; Babai
1986; Schnorr–Euchner 1994).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import scipy.linalg

from ._validate import _real_array, choice_iv, float_iv, int_iv, problem_iv
from .babai import babai
from .enumeration import enumerate as _enumerate
from .kbest import kbest
from .result import BILSResult, Status

__all__ = ["Codebook", "LatticeFit", "ENCODE_METHODS", "encode", "decode", "fit_generator",
           "compand", "expand", "default_box"]

#: Encoding methods of :func:`encode`.
ENCODE_METHODS = ("round_off", "nearest_plane", "kbest", "exact")

#: Step of the MSE-optimal uniform quantizer with ``2**b`` levels for a unit Gaussian
#: (Max 1960; Hui & Neuhoff 2001), b = 1..8: the initial scale of :func:`fit_generator`.
_GAUSS_STEP = (1.596, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308)

#: Multipliers of the initial step tried by :func:`fit_generator` (the best one is kept).
_INIT_SCALES = (0.6, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 1.8)

#: Trial steps per iteration of :func:`fit_generator`: the full step, then halvings.
_MAX_STEPS = 7


def default_box(bits):
    r"""The default box of :math:`2^b` integers: :math:`[-2^{b-1},\, 2^{b-1} - 1]`.

    With the default code offset :math:`o = \tfrac12` the reproduction values
    :math:`z + o \in \{-2^{b-1} + \tfrac12, \dots, 2^{b-1} - \tfrac12\}` are symmetric
    about 0 (a mid-rise grid), so the codebook is symmetric under :math:`v \to -v`.

    Examples
    --------
    >>> from bils.lattice import default_box
    >>> default_box(2)
    (-2, 1)
    """
    bits = int_iv("bits", bits, minimum=1)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# ---------------------------------------------------------------------------- µ-law
def compand(x, mu, amax):
    r"""µ-law compressor :math:`F(x) = a\,\mathrm{sign}(x)\,\ln(1 + \mu|x|/a)/\ln(1+\mu)`.

    Maps :math:`[-a, a]` onto itself, stretching small magnitudes (where weights are
    dense) and compressing large ones; :func:`expand` is its inverse.

    Parameters
    ----------
    x : array_like
    mu : float > 0
        Compression strength (GLVQ keeps it in [10, 255]).
    amax : float > 0
        Range :math:`a` (e.g. the largest magnitude of the group).

    Examples
    --------
    >>> import numpy as np
    >>> from bils.lattice import compand, expand
    >>> x = np.array([-1.0, -0.01, 0.0, 0.3, 1.0])
    >>> y = compand(x, 50.0, 1.0)
    >>> np.round(y, 3).tolist()
    [-1.0, -0.103, 0.0, 0.705, 1.0]
    >>> bool(np.allclose(expand(y, 50.0, 1.0), x))
    True
    """
    mu, amax = _mu_iv(mu, amax)
    x = np.asarray(x, dtype=np.float64)
    return amax * np.sign(x) * np.log1p(mu * np.abs(x) / amax) / math.log1p(mu)


def expand(y, mu, amax):
    r"""µ-law expander :math:`F^{-1}(y) = a\,\mathrm{sign}(y)\,((1+\mu)^{|y|/a} - 1)/\mu`.

    The inverse of :func:`compand` (same parameters).
    """
    mu, amax = _mu_iv(mu, amax)
    y = np.asarray(y, dtype=np.float64)
    return amax * np.sign(y) * np.expm1(np.abs(y) / amax * math.log1p(mu)) / mu


def _mu_iv(mu, amax):
    mu = float_iv("mu", mu, positive=True)
    amax = float_iv("amax", amax, positive=True)
    return mu, amax


# ---------------------------------------------------------------------------- codebook
@dataclass(frozen=True, eq=False)
class Codebook:
    r"""A lattice codebook: generator, box of integer codes, code offset, compander.

    Reproduction point of a code :math:`z` (one sub-vector):
    :math:`\hat v = G (z + o)`, or :math:`\mathrm{expand}(G(z+o))` with a compander.

    Parameters
    ----------
    G : (d, d) array_like
        Non-singular generator; its columns are the lattice basis vectors.
    bits : int >= 1
        Codes per dimension: :math:`2^b`.
    lo, hi : int or (d,) array_like of int, optional
        Box of the codes; default :func:`default_box` ``(bits)``, i.e.
        :math:`[-2^{b-1}, 2^{b-1}-1]`. ``hi - lo + 1`` may be at most :math:`2^b`.
    offset : float or (d,) array_like, default 0.5
        Code offset :math:`o`. The default 0.5 with the default box gives a grid
        symmetric about 0; ``offset=0`` makes 0 a code (mid-tread).
    mu, amax : float, optional
        µ-law compander (:func:`compand`): encoding works on ``compand(v)``,
        decoding returns ``expand(G (z + o))``. Both or neither.

    Attributes
    ----------
    G : (d, d) ndarray of float64 (read-only)
    bits : int
    lo, hi : (d,) ndarray of int64 (read-only)
    offset : (d,) ndarray of float64 (read-only)
    mu, amax : float or None

    Examples
    --------
    >>> import numpy as np, bils
    >>> cb = bils.Codebook(np.eye(2), bits=2)
    >>> cb.d, cb.lo.tolist(), cb.hi.tolist(), cb.offset.tolist()
    (2, [-2, -2], [1, 1], [0.5, 0.5])
    """

    G: Any
    bits: int
    lo: Any = None
    hi: Any = None
    offset: Any = 0.5
    mu: float | None = None
    amax: float | None = None

    def __post_init__(self):
        G = _real_array("G", self.G)
        if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
            raise ValueError(f"`G` must be a square (d, d) array with d >= 1, got shape {G.shape}")
        G = np.array(G, dtype=np.float64)
        if not np.all(np.isfinite(G)):
            raise ValueError("`G` must be finite (no NaN or inf)")
        sv = np.linalg.svd(G, compute_uv=False)
        if not sv[-1] > 1e-12 * max(sv[0], 1e-300):
            raise ValueError("`G` must be non-singular (condition number below 1e12)")
        d = G.shape[0]
        bits = int_iv("bits", self.bits, minimum=1)
        if bits > 16:
            raise ValueError(f"`bits` must be <= 16, got {bits}")
        dlo, dhi = default_box(bits)
        box = []
        for name, b, default in (("lo", self.lo, dlo), ("hi", self.hi, dhi)):
            b = np.asarray(default if b is None else b)
            if b.dtype.kind not in "iuf" or not np.all(np.isfinite(b)) or np.any(b != np.round(b)):
                raise ValueError(f"`{name}` must hold finite integers")
            try:
                b = np.broadcast_to(b.astype(np.int64), (d,)).copy()
            except ValueError:
                raise ValueError(f"`{name}` must be a scalar or have shape ({d},), got {b.shape}") from None
            box.append(b)
        lo, hi = box
        if np.any(lo > hi):
            raise ValueError("`lo` must not exceed `hi` (elementwise)")
        if np.any(hi - lo + 1 > (1 << bits)):
            raise ValueError(f"`hi - lo + 1` must be at most 2**bits = {1 << bits}")
        off = _real_array("offset", self.offset).astype(np.float64)
        if not np.all(np.isfinite(off)):
            raise ValueError("`offset` must be finite")
        try:
            off = np.broadcast_to(off, (d,)).copy()
        except ValueError:
            raise ValueError(f"`offset` must be a scalar or have shape ({d},), got {off.shape}") from None
        if (self.mu is None) != (self.amax is None):
            raise ValueError("`mu` and `amax` must be given together (or neither)")
        mu = amax = None
        if self.mu is not None:
            mu, amax = _mu_iv(self.mu, self.amax)
        for a in (G, lo, hi, off):
            a.flags.writeable = False
        for name, v in (("G", G), ("bits", bits), ("lo", lo), ("hi", hi), ("offset", off),
                        ("mu", mu), ("amax", amax)):
            object.__setattr__(self, name, v)

    @property
    def d(self) -> int:
        """Sub-vector dimension."""
        return self.G.shape[0]

    @property
    def companded(self) -> bool:
        """Whether a µ-law compander is attached."""
        return self.mu is not None

    def replace(self, **changes) -> "Codebook":
        """A copy with some fields changed (validated again)."""
        fields = {"G": self.G, "bits": self.bits, "lo": self.lo, "hi": self.hi,
                  "offset": self.offset, "mu": self.mu, "amax": self.amax}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"unknown Codebook field(s): {sorted(unknown)}")
        fields.update(changes)
        return Codebook(**fields)

    def __repr__(self) -> str:
        comp = f", mu={self.mu:.4g}, amax={self.amax:.4g}" if self.companded else ""
        return f"Codebook(d={self.d}, bits={self.bits}{comp})"


# ---------------------------------------------------------------------------- validation
def _codebook_iv(codebook):
    if not isinstance(codebook, Codebook):
        raise TypeError(f"`codebook` must be a bils.Codebook, got {type(codebook).__name__}")
    return codebook


def _vectors_iv(name, V, d):
    """``V`` as float64 (n, N) with ``n`` a multiple of ``d``; and whether it was 1-D."""
    V = _real_array(name, V)
    if V.ndim not in (1, 2):
        raise ValueError(f"`{name}` must be 1-D (n,) or 2-D (n, N), got {V.ndim}-D")
    squeeze = V.ndim == 1
    V = np.asarray(V, dtype=np.float64).reshape(V.shape[0], -1)
    n, N = V.shape
    if n == 0 or n % d:
        raise ValueError(f"`{name}` must have a positive multiple of d = {d} rows, got {n}")
    if N == 0:
        raise ValueError(f"`{name}` must have at least one column")
    if not np.all(np.isfinite(V)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")
    return V, squeeze


def _metric_factor(metric, n):
    """Upper Cholesky factor ``C`` of the metric (``M = C^T C``); identity for None."""
    if metric is None:
        return np.eye(n)
    M = _real_array("metric", metric).astype(np.float64)
    if M.shape != (n, n):
        raise ValueError(f"`metric` must have shape ({n}, {n}) to match `V`, got {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("`metric` must be finite (no NaN or inf)")
    if not np.allclose(M, M.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(M).max())):
        raise ValueError("`metric` must be symmetric")
    try:
        return scipy.linalg.cholesky(0.5 * (M + M.T), lower=False)
    except np.linalg.LinAlgError:
        raise ValueError("`metric` must be positive definite") from None


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
        Passed to the solver (``"round_off"`` is numpy).

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
    codebook = _codebook_iv(codebook)
    V, squeeze = _vectors_iv("V", V, codebook.d)
    method = choice_iv("method", method, ENCODE_METHODS)
    beam_width = int_iv("beam_width", beam_width, minimum=1)
    max_nodes = int_iv("max_nodes", max_nodes, minimum=1, allow_none=True)
    C = _metric_factor(metric, V.shape[0])
    if codebook.companded:
        V = compand(V, codebook.mu, codebook.amax)
    return _encode(codebook, V, C, method, beam_width, max_nodes, backend, squeeze)


def _lattice_range_iv(lat):
    """The encoding BILS must be in the solvers' safe range (finite costs for every method)."""
    try:
        with np.errstate(all="ignore"):
            problem_iv(lat.R, lat.Y, lat.lo, lat.hi, None, lat.offset)
    except ValueError as exc:
        raise ValueError("the encoding problem built from `codebook.G`, `V` and `metric` is out of "
                         f"floating-point range: {exc}") from None


def _encode(codebook, V, C, method, beam_width, max_nodes, backend, squeeze=False):
    """:func:`encode` on validated (and companded) ``V`` and metric factor ``C``."""
    lat = _build(codebook, V, C)
    _lattice_range_iv(lat)
    N = V.shape[1]
    info = {}
    if method == "round_off":
        from ._backend import resolve_backend

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
    codebook = _codebook_iv(codebook)
    Z = _real_array("Z", Z)
    if Z.dtype.kind == "f" and (not np.all(np.isfinite(Z)) or np.any(Z != np.round(Z))):
        raise ValueError("`Z` must hold integers")
    Zf, squeeze = _vectors_iv("Z", Z, codebook.d)
    d, (n, N) = codebook.d, Zf.shape
    lo, hi = np.tile(codebook.lo, n // d)[:, None], np.tile(codebook.hi, n // d)[:, None]
    if np.any(Zf < lo) or np.any(Zf > hi):
        raise ValueError("`Z` must lie inside the codebook box [lo, hi]")
    out = _decode(codebook, Zf)
    return out[:, 0] if squeeze else out


def _decode(codebook, Z):
    d = codebook.d
    n, N = Z.shape
    S = (Z.reshape(n // d, d, N) + codebook.offset[None, :, None])
    out = np.einsum("ij,mjk->mik", codebook.G, S).reshape(n, N)
    if codebook.companded:
        out = expand(out, codebook.mu, codebook.amax)
    return out


# ---------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class LatticeFit:
    """Result of :func:`fit_generator`.

    Attributes
    ----------
    codebook : Codebook
        The fitted codebook.
    x : (n, N) ndarray of int64
        Codes of ``V`` under the fitted codebook (= ``encode(codebook, V, metric,
        method=encode_method).x``).
    cost : (N,) ndarray
        Metric distance per column for those codes.
    history : (n_accepted + 1,) ndarray
        The reported loss of the initial codebook and after each accepted step;
        strictly decreasing.
    info : mapping
        ``n_iter`` (iterations run), ``n_rejected`` (backtracking halvings rejected),
        ``init_scale`` (the chosen multiple of the Gaussian step), ``stopped``
        (``"n_iter"`` or ``"no_decrease"``).

    Examples
    --------
    >>> import numpy as np, bils
    >>> rng = np.random.default_rng(0)
    >>> V = rng.standard_normal((4, 200))  # 200 vectors, two 2-D sub-vectors each
    >>> fit = bils.fit_generator(V, 2, d=2, n_iter=3, backend="numpy")
    >>> fit.codebook, fit.x.shape, fit.cost.shape
    (Codebook(d=2, bits=2), (4, 200), (200,))
    >>> len(fit.history), bool(fit.loss == fit.history[-1]), fit.info["stopped"]
    (4, True, 'n_iter')
    >>> bool(np.array_equal(bils.lattice.encode(fit.codebook, V, backend="numpy").x, fit.x))
    True
    """

    codebook: Codebook
    x: np.ndarray
    cost: np.ndarray
    history: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @property
    def loss(self) -> float:
        """Final reported loss (``history[-1]``)."""
        return float(self.history[-1])


def _ls_generator(V, Zo, M, wts, G0, lam):
    r"""Minimise :math:`\sum_j w_j\lVert C(v_j - (I\otimes G)\hat z_j)\rVert^2 / \sum w
    + \lambda \lVert G - G_0\rVert_F^2` over :math:`G` (normal equations, d² unknowns)."""
    n, N = V.shape
    d = G0.shape[0]
    m = n // d
    Zw = Zo * (wts / wts.sum())[None, :]
    # vec(C_s G z_s) = (z_sᵀ ⊗ C_s) vec(G) (column-major vec), so the normal matrix is
    # Σ_{s,t} kron(Zw_s Zo_tᵀ, M_st): entry [(a, i), (b, j)] = Σ_st P[s,a,t,b] M[s,i,t,j]
    P = (Zw @ Zo.T).reshape(m, d, m, d).transpose(0, 2, 1, 3).reshape(m * m, d * d)
    M4 = M.reshape(m, d, m, d).transpose(0, 2, 1, 3).reshape(m * m, d * d)
    A = (P.T @ M4).reshape(d, d, d, d).transpose(0, 2, 1, 3).reshape(d * d, d * d)
    K = ((M @ V) @ Zw.T).reshape(m, d, m, d)
    rhs = np.einsum("sisa->ia", K)  # Σ_s (M V)_s Zw_sᵀ
    A[np.diag_indices_from(A)] += lam
    b = rhs.reshape(-1, order="F") + lam * G0.reshape(-1, order="F")
    g = scipy.linalg.solve(A, b, assume_a="sym")
    return g.reshape(d, d, order="F")


def _clip_sv(G, bounds):
    U, s, Vt = np.linalg.svd(G)
    return (U * np.clip(s, bounds[0], bounds[1])) @ Vt


def fit_generator(V, bits, *, d, metric=None, weights=None, n_iter=10, penalty=1e-3,
                  sv_bounds=(0.25, 4.0), encode_method="nearest_plane", offset=0.5, mu=None,
                  G0=None, beam_width=8, max_nodes=None, backend="auto"):
    r"""Fit a generator to vectors: alternate encoding and a least-squares step on G.

    Minimises the (weighted) mean metric distance plus a penalty toward the initial
    generator,

    .. math::

        L(G, Z) = \frac{\sum_j w_j\, (v_j - \hat v_j)^T M (v_j - \hat v_j)}{\sum_j w_j}
        + \lambda\,\frac{\mathrm{tr} M}{n}\,\lVert G - G_0\rVert_F^2,
        \qquad \hat v_j = (I_m \otimes G)(z_j + o),

    by block coordinate descent: encode (fix :math:`G`, :func:`encode` with
    ``encode_method``), then the exact least-squares minimiser over :math:`G` for fixed
    codes (normal equations in :math:`d^2` unknowns), singular values clipped to
    ``sv_bounds``. The step is accepted only if, after re-encoding, the loss decreases;
    otherwise it is halved (up to 3 times) and the fit stops when no halving helps. So
    the reported ``history`` is strictly decreasing.

    Initialisation (GLVQ): :math:`G_0 = \alpha\,\Delta_b\,L` where
    :math:`L L^T` is the covariance of the sub-vectors, :math:`\Delta_b` the MSE-optimal
    uniform step of a unit Gaussian with :math:`2^b` levels, and :math:`\alpha` the best
    of a few multiples (0.6–1.5) under the loss.

    Parameters
    ----------
    V : (n, N) array_like
        Training vectors, ``n`` a multiple of ``d`` (``m = n / d`` sub-vectors each).
    bits : int
        Codes per dimension :math:`2^b` (default box, see :func:`default_box`).
    d : int
        Sub-vector (lattice) dimension.
    metric : (n, n) array_like, optional
        SPD metric shared by all columns (default identity).
    weights : (N,) array_like, optional
        Non-negative column weights :math:`w_j` (default 1).
    n_iter : int, default 10
        Maximum number of encode/update iterations.
    penalty : float >= 0, default 1e-3
        :math:`\lambda`, relative to the mean diagonal of the metric.
    sv_bounds : (float, float) or None, default (0.25, 4.0)
        Singular values of :math:`G` are kept in
        ``[sv_bounds[0] * min σ(G0), sv_bounds[1] * max σ(G0)]``.
    encode_method : str, default "nearest_plane"
        One of :data:`ENCODE_METHODS`.
    offset : float or (d,) array_like, default 0.5
        Code offset of the codebook.
    mu : float, optional
        µ-law compander strength; ``amax`` is the largest magnitude of ``V``. Fitting
        then happens in the companded domain (the loss is measured there).
    G0 : (d, d) array_like, optional
        Initial generator instead of the Cholesky initialisation (no scale search).
    beam_width, max_nodes, backend
        Passed to :func:`encode`.

    Returns
    -------
    LatticeFit

    Examples
    --------
    >>> import numpy as np, bils
    >>> rng = np.random.default_rng(0)
    >>> V = np.linalg.cholesky([[1.0, 0.8], [0.8, 1.0]]) @ rng.standard_normal((2, 500))
    >>> fit = bils.fit_generator(V, 2, d=2, n_iter=5, backend="numpy")
    >>> bool(np.all(np.diff(fit.history) < 0)), fit.codebook
    (True, Codebook(d=2, bits=2))
    >>> bool(np.allclose(bils.lattice.decode(fit.codebook, fit.x).shape, V.shape))
    True
    """
    d = int_iv("d", d, minimum=1)
    bits = int_iv("bits", bits, minimum=1)
    V, _ = _vectors_iv("V", V, d)
    n, N = V.shape
    C = _metric_factor(metric, n)
    M = C.T @ C
    if weights is None:
        wts = np.ones(N)
    else:
        wts = _real_array("weights", weights).astype(np.float64)
        if wts.shape != (N,) or not np.all(np.isfinite(wts)) or np.any(wts < 0) or wts.sum() <= 0:
            raise ValueError(f"`weights` must be finite, >= 0, not all 0, with shape ({N},)")
    n_iter = int_iv("n_iter", n_iter, minimum=0)
    penalty = float_iv("penalty", penalty)
    if penalty < 0:
        raise ValueError(f"`penalty` must be >= 0, got {penalty}")
    if sv_bounds is not None:
        if (not isinstance(sv_bounds, (tuple, list)) or len(sv_bounds) != 2
                or not all(isinstance(b, numbers.Real) and np.isfinite(b) for b in sv_bounds)
                or not 0 < sv_bounds[0] <= 1 <= sv_bounds[1]):
            raise ValueError("`sv_bounds` must be None or (lo, hi) with 0 < lo <= 1 <= hi")
    encode_method = choice_iv("encode_method", encode_method, ENCODE_METHODS)
    beam_width = int_iv("beam_width", beam_width, minimum=1)
    max_nodes = int_iv("max_nodes", max_nodes, minimum=1, allow_none=True)
    amax = None
    if mu is not None:
        amax = float(np.max(np.abs(V)))
        if amax == 0:
            raise ValueError("`V` must not be all zeros when companding (`mu` given)")
        mu, amax = _mu_iv(mu, amax)
        V = compand(V, mu, amax)
    lam = penalty * np.trace(M) / n
    wsum = wts.sum()

    def evaluate(G):
        cb = Codebook(G, bits, offset=offset, mu=mu, amax=amax)
        res = _encode(cb, V, C, encode_method, beam_width, max_nodes, backend)
        loss = float(wts @ res.cost) / wsum + lam * float(np.sum((G - G0) ** 2))
        return cb, res, loss

    if G0 is None:
        Sub = V.reshape(n // d, d, N).transpose(1, 0, 2).reshape(d, -1)
        cov = Sub @ Sub.T / Sub.shape[1]
        cov[np.diag_indices(d)] += 1e-8 * max(np.trace(cov) / d, 1e-300) + 1e-300
        L = np.linalg.cholesky(cov)
        step = _GAUSS_STEP[bits - 1] if bits <= len(_GAUSS_STEP) else 4.0 * 2.0 ** -bits
        best = None
        for a in _INIT_SCALES:
            G0 = a * step * L
            cand = evaluate(G0)
            if best is None or cand[2] < best[1][2]:
                best = (a, cand)
        init_scale, (cb, res, loss) = best
        G0 = cb.G
    else:
        G0 = _real_array("G0", G0).astype(np.float64)
        if G0.shape != (d, d):
            raise ValueError(f"`G0` must have shape ({d}, {d}), got {G0.shape}")
        init_scale = None
        cb, res, loss = evaluate(G0)
    s0 = np.linalg.svd(G0, compute_uv=False)
    if sv_bounds is None:  # still keep G safely invertible
        bounds = (1e-6 * s0[0], np.inf)
    else:
        bounds = (sv_bounds[0] * s0[-1], sv_bounds[1] * s0[0])
    history = [loss]
    rejected = 0
    stopped = "n_iter"
    it = 0
    for it in range(1, n_iter + 1):
        Zo = res.x + np.tile(cb.offset, n // d)[:, None]
        target = _clip_sv(_ls_generator(V, Zo, M, wts, G0, lam), bounds)
        G = cb.G
        for _ in range(_MAX_STEPS):  # full step, then halvings
            cand = evaluate(target)
            if cand[2] < loss:
                break
            rejected += 1
            target = _clip_sv(0.5 * (G + target), bounds)
        else:
            stopped = "no_decrease"
            break
        cb, res, loss = cand
        history.append(loss)
    return LatticeFit(cb, res.x, res.cost, np.asarray(history),
                      {"n_iter": it, "n_rejected": rejected, "init_scale": init_scale,
                       "stopped": stopped})

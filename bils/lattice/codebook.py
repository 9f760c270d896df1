r"""The lattice codebook (:class:`Codebook`), its default box and the argument checks
shared by the encoders and the fitting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from .._validate import _real_array, int_iv
from .compander import check_mu

__all__ = ["Codebook", "default_box"]


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
            mu, amax = check_mu(self.mu, self.amax)
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


# ---------------------------------------------------------------------------- argument checks
def check_codebook(codebook):
    """`codebook` itself, after checking it is a :class:`Codebook`."""
    if not isinstance(codebook, Codebook):
        raise TypeError(f"`codebook` must be a bils.Codebook, got {type(codebook).__name__}")
    return codebook


def check_vectors(name, V, d):
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


def metric_factor(metric, n):
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

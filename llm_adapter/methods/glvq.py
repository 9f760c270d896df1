r"""Grouped lattice vector quantization of a linear layer (the ``glvq`` method).

A weight matrix :math:`W` (out, in) is cut into column groups of ``group_size`` input
columns; inside a group every output row is a sequence of sub-vectors of ``d``
consecutive weights. Each group :math:`g` has its own generator :math:`G_g` (d × d,
stored in fp16) and every sub-vector is a code :math:`z \in [-2^{b-1}, 2^{b-1}-1]^d`
(GLVQ, arXiv:2510.20984):

.. math::

    \hat W_{j,\,\text{sub-vector } s} = r_j\; c_s \circ G_g\,(z_{js} + \tfrac12),

with an optional fp16 scale :math:`r_j` per output row and :math:`c_i` per input column
(both on by default: a generator shared by all rows cannot follow the row norms, which
vary by orders of magnitude in LLM layers).

The codes minimise the layer objective :math:`\sum_j (w_j - \hat w_j)^T H (w_j - \hat w_j)`
(:math:`H` the damped input Gram) by *block nearest plane*: with :math:`H = R^T R`,
groups are decided one after the other (last first, like GPTQ on reversed columns) and
the error of the decided groups is fed back into the targets of the remaining ones.
Inside group :math:`g` the problem is exactly a lattice encoding under the metric
:math:`M_g = R_{gg}^T R_{gg}` (:func:`bils.lattice.encode`), and :math:`G_g` is fitted to
it by :func:`bils.fit_generator` (initialised from the Cholesky factor of the
sub-vector covariance).

Storage per layer: the codes (``bits`` per weight, or b−1 / b / b+1 per group with
salience-based allocation), per group the fp16 generator (16 d² bits) and, with a
compander, fp16 µ and range; fp16 row and column scales. :attr:`LatticeLayer.bits_per_weight`
counts all of it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from bils.lattice import ENCODE_METHODS, Codebook, decode, encode, fit_generator
from bils.targets import joint_target

from ..errors import ParameterError, QuantizedFormatError
from ..formats.packing import SUPPORTED_BITS, pack, pack_width, packed_length, unpack
from ._shared import as_float64, damped_hessian, is_int, is_real, with_fallback
from .registry import LayerFormat, Method, register

__all__ = ["GLVQSpec", "GLVQ_FORMAT", "LatticeLayer", "quantize_weight_glvq", "salience_bits"]

#: Lattice dimensions of the storage format and the decode kernel.
LATTICE_DIMS = (2, 4, 8, 16, 32)
#: Decision orders of the sub-vector blocks.
GLVQ_ORDERS = ("natural", "act")


@dataclass(frozen=True)
class GLVQSpec:
    r"""How one linear layer is quantized with grouped lattice VQ (``method == "glvq"``).

    Every field is validated in ``__post_init__``; errors name the field.

    Parameters
    ----------
    bits : int, 1..8
        Code bits per weight :math:`b` (per dimension of the lattice).
    d : int in {2, 4, 8, 16, 32}
        Lattice dimension (sub-vector length).
    group_size : int
        Input columns per generator; a multiple of ``d``. The last group may be shorter
        (``in_features`` must be a multiple of ``d``).
    encode : {"nearest_plane", "round_off", "kbest", "exact"}
        Encoder of the stored codes inside a group (:func:`bils.lattice.encode`).
    fit_encode : str or None
        Encoder used while fitting the generator (:func:`bils.fit_generator`); ``None``:
        the same as ``encode``. E.g. fit with ``"nearest_plane"`` and store ``"exact"``
        codes when exact fitting is too slow.
    n_iter : int >= 0
        Generator-fitting iterations per group (:func:`bils.fit_generator`).
    penalty : float >= 0
        Penalty toward the initial generator (relative to the metric's mean diagonal).
    sv_bounds : (float, float) or None
        Singular values of :math:`G` relative to those of the initial generator.
    damp : float >= 0
        ``damp * mean(diag H)`` added to the diagonal of ``H`` (as GPTQ).
    row_scale, col_scale : bool
        fp16 scale per output row (RMS of the row) / per input column (RMS of the
        row-normalised column).
    order : {"act", "natural"}
        Decision order: ``"act"`` decides groups with the largest
        :math:`\sum_{i\in g} H_{ii}\lVert W_{:,i}\rVert^2` first and, inside a group, the
        sub-vectors with the largest :math:`\sum_i H_{ii}` first (GPTQ's act-order at the
        granularity of sub-vectors; groups stay contiguous, so storage is unaffected).
    salience_frac : float in [0, 0.5]
        Fraction of groups coded with ``bits + 1``; the same number of least salient
        groups get ``bits - 1`` (average ``bits`` when the groups have equal widths).
        Salience: the mean over the group's columns of :math:`H_{ii}\lVert W_{:,i}\rVert^2`.
    mu : float > 0 or None
        µ-law compander per group (range = largest magnitude of the normalised targets).
    beam_width : int >= 1
        For ``encode="kbest"``.
    max_nodes : int >= 1 or None
        For ``encode="exact"`` (per sub-vector).
    alpha : float in [0, 1]
        Joint target: the codes approximate :math:`W_\alpha = W + \alpha W D H_d^{-1}`
        (:func:`bils.joint_target`, the target of ojbkq/regcal) instead of ``W``; the
        calibration then collects ``D``. ``0`` (default): ``W``, ``D`` unused.

    Notes
    -----
    Defaults and the evidence (``benchmarks/lattice_quality.py``, SmolLM2-135M, 2 bits,
    d = 8, 2.036 bits/weight with all overhead, results in ``docs/results.md``). With the
    sequential 128-window protocol of ``benchmarks/llm_quality.py``: exact codes (fitted
    with nearest plane) perplexity 173.2, nearest-plane codes 169.5, round-off codes
    (GLVQ's rule) 305.6, against uniform gptq W2 g64 (2.28 bits/weight) 909 and W2 g128
    5101; mean relative layer loss exact 0.0350 < nearest plane 0.0379 < round-off 0.0431.
    With float-model statistics (32 windows) exact gave 777 against 4421 for nearest
    plane. Exact is the default for its lower layer loss; nearest plane costs about two
    thirds of the time (the fit dominates). On the five layers of the layer study:
    round-off is worse than nearest plane on all five; fitting the generator lowers the
    loss by 6–95 %; act-order beats the natural order on all five; column scales help on
    two and hurt on three for +0.03 bit/weight; salience allocation (25 %) hurts on four.

    Examples
    --------
    >>> spec = GLVQSpec(bits=2, d=4, group_size=16)
    >>> spec.method, spec.encode, spec.fit_encode, spec.order
    ('glvq', 'exact', 'nearest_plane', 'act')
    >>> d = spec.to_dict()
    >>> d["sv_bounds"], GLVQSpec.from_dict(d) == spec
    ([0.25, 4.0], True)
    >>> GLVQSpec(d=3)
    Traceback (most recent call last):
        ...
    llm_adapter.errors.ParameterError: `d` must be one of (2, 4, 8, 16, 32), got 3
    """

    bits: int = 2
    d: int = 8
    group_size: int = 128
    encode: str = "exact"
    fit_encode: str | None = "nearest_plane"
    n_iter: int = 20
    penalty: float = 1e-3
    sv_bounds: tuple | None = (0.25, 4.0)
    damp: float = 0.01
    row_scale: bool = True
    col_scale: bool = False
    order: str = "act"
    salience_frac: float = 0.0
    mu: float | None = None
    beam_width: int = 8
    max_nodes: int | None = None
    alpha: float = 0.0

    def __post_init__(self):
        if not is_int(self.bits) or not 1 <= self.bits <= 8:
            raise ParameterError("bits", f"`bits` must be an int in [1, 8], got {self.bits!r}")
        if self.d not in LATTICE_DIMS or not is_int(self.d):
            raise ParameterError("d", f"`d` must be one of {LATTICE_DIMS}, got {self.d!r}")
        if not is_int(self.group_size) or self.group_size < self.d or self.group_size % self.d:
            raise ParameterError("group_size", f"`group_size` must be a positive multiple of `d` = {self.d}, got {self.group_size!r}")
        if self.encode not in ENCODE_METHODS:
            raise ParameterError("encode", f"`encode` must be one of {ENCODE_METHODS}, got {self.encode!r}")
        if self.fit_encode is not None and self.fit_encode not in ENCODE_METHODS:
            raise ParameterError("fit_encode", f"`fit_encode` must be None or one of {ENCODE_METHODS}, got {self.fit_encode!r}")
        if not is_int(self.n_iter) or self.n_iter < 0:
            raise ParameterError("n_iter", f"`n_iter` must be an int >= 0, got {self.n_iter!r}")
        for name in ("penalty", "damp"):
            v = getattr(self, name)
            if not is_real(v) or v < 0:
                raise ParameterError(name, f"`{name}` must be a finite float >= 0, got {v!r}")
        if self.sv_bounds is not None:
            sv = self.sv_bounds
            if (not isinstance(sv, (tuple, list)) or len(sv) != 2 or not all(is_real(x) for x in sv)
                    or not 0 < sv[0] <= 1 <= sv[1]):
                raise ParameterError("sv_bounds", f"`sv_bounds` must be None or (lo, hi) with 0 < lo <= 1 <= hi, got {sv!r}")
            object.__setattr__(self, "sv_bounds", (float(sv[0]), float(sv[1])))
        for name in ("row_scale", "col_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(name, f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if self.order not in GLVQ_ORDERS:
            raise ParameterError("order", f"`order` must be one of {GLVQ_ORDERS}, got {self.order!r}")
        if not is_real(self.salience_frac) or not 0 <= self.salience_frac <= 0.5:
            raise ParameterError("salience_frac", f"`salience_frac` must be a float in [0, 0.5], got {self.salience_frac!r}")
        if self.salience_frac > 0 and self.bits < 2:
            raise ParameterError("salience_frac", "`salience_frac` > 0 needs `bits` >= 2 (the least salient groups get bits - 1)")
        if self.mu is not None and (not is_real(self.mu) or self.mu <= 0):
            raise ParameterError("mu", f"`mu` must be None or a float > 0, got {self.mu!r}")
        if not is_int(self.beam_width) or self.beam_width < 1:
            raise ParameterError("beam_width", f"`beam_width` must be an int >= 1, got {self.beam_width!r}")
        if self.max_nodes is not None and (not is_int(self.max_nodes) or self.max_nodes < 1):
            raise ParameterError("max_nodes", f"`max_nodes` must be None or an int >= 1, got {self.max_nodes!r}")
        if not is_real(self.alpha) or not 0 <= self.alpha <= 1:
            raise ParameterError("alpha", f"`alpha` must be a float in [0, 1], got {self.alpha!r}")

    @property
    def method(self) -> str:
        """Always ``"glvq"`` (the dispatch key next to :class:`llm_adapter.methods.uniform.QuantSpec`)."""
        return "glvq"

    @property
    def joint(self) -> bool:
        """Whether the cross term ``D`` is used (``alpha > 0``: the joint target)."""
        return self.alpha > 0

    @property
    def alpha_beta(self) -> None:
        """``None``: no per-sequence α sampling."""
        return None

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return (f"{self.bits}-bit lattice codes, d = {self.d}, one generator per {self.group_size} columns, "
                f"encode {self.encode}")

    def to_dict(self) -> dict:
        """Plain ``dict`` of the fields plus ``method`` (JSON-serialisable)."""
        d = asdict(self)
        d["sv_bounds"] = None if self.sv_bounds is None else list(self.sv_bounds)
        d["method"] = "glvq"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GLVQSpec":
        d = dict(d)
        if d.pop("method", "glvq") != "glvq":
            raise ParameterError("method", "`method` must be 'glvq' for a GLVQSpec")
        if d.get("sv_bounds") is not None:
            d["sv_bounds"] = tuple(d["sv_bounds"])
        return cls(**d)


# --------------------------------------------------------------------------- layer type
@dataclass
class LatticeLayer:
    r"""Codes and generators of one layer quantized with grouped lattice VQ.

    Dequantization of group :math:`g` (columns ``group_bounds(g)``) and row :math:`j`:
    :math:`\hat W_{j,g} = r_j\, c_g \circ \mathrm{decode}(\mathrm{codebook}(g), z_{j,g})`
    with :math:`z = \text{codes} + lo_g` and :func:`bils.lattice.decode` per sub-vector.

    Attributes
    ----------
    codes : (out, in) ndarray of uint8
        Code offsets ``z - lo`` in ``[0, 2**group_bits[g] - 1]``, original column order.
    generators : (n_groups, d, d) ndarray of float16
    group_bits : (n_groups,) ndarray of uint8
    row_scale : (out,) ndarray of float16 or None
    col_scale : (in,) ndarray of float16 or None
    mu, amax : (n_groups,) ndarray of float16 or None
        µ-law compander per group.
    d, group_size : int
    offset : float
        Code offset :math:`o` (0.5: a grid symmetric about 0).
    bias : (out,) ndarray of float32 or None
    stats : dict
        ``loss``, ``rel_loss``, ``time``, ``method``, ``encode``, ``bits_per_weight``,
        ``fit_gain`` (mean final/initial fitting loss), ``edge_frac`` (fraction of codes
        on a face of the box).

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 32)); X = rng.standard_normal((32, 128))
    >>> spec = GLVQSpec(bits=2, d=4, group_size=16, n_iter=2, encode="nearest_plane")
    >>> q = quantize_weight_glvq(W, X @ X.T, spec=spec, backend="numpy")
    >>> q.shape, q.n_groups, q.group_bounds(1), q.generators.shape, q.group_bits.tolist()
    ((8, 32), 2, (16, 32), (2, 4, 4), [2, 2])
    >>> q.codebook(0), q.dequantize().shape
    (Codebook(d=4, bits=2), (8, 32))
    >>> q.storage_bits(), q.bits_per_weight  # 256 codes of 2 bits + fp16 generators, row scales
    (1152, 4.5)
    """

    codes: np.ndarray
    generators: np.ndarray
    group_bits: np.ndarray
    d: int
    group_size: int
    row_scale: np.ndarray | None = None
    col_scale: np.ndarray | None = None
    mu: np.ndarray | None = None
    amax: np.ndarray | None = None
    offset: float = 0.5
    bias: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        out, n = self.codes.shape
        if n % self.d:
            raise ValueError(f"`codes` has {n} columns, not a multiple of d = {self.d}")
        ng = self.n_groups
        if self.generators.shape != (ng, self.d, self.d):
            raise ValueError(f"`generators` must have shape ({ng}, {self.d}, {self.d}), got {self.generators.shape}")
        if self.group_bits.shape != (ng,):
            raise ValueError(f"`group_bits` must have shape ({ng},), got {self.group_bits.shape}")
        if (self.mu is None) != (self.amax is None):
            raise ValueError("`mu` and `amax` must be given together (or neither)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def n_groups(self) -> int:
        return -(-self.codes.shape[1] // self.group_size)

    def group_bounds(self, g: int) -> tuple[int, int]:
        """Column range ``[a, b)`` of group ``g``."""
        a = g * self.group_size
        return a, min(self.codes.shape[1], a + self.group_size)

    def codebook(self, g: int) -> Codebook:
        """The :class:`bils.Codebook` of group ``g`` (fp16 values, computed in float64)."""
        comp = {}
        if self.mu is not None:
            comp = {"mu": float(self.mu[g]), "amax": float(self.amax[g])}
        return Codebook(self.generators[g].astype(np.float64), int(self.group_bits[g]),
                        offset=self.offset, **comp)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """Float weights ``(out, in)``: per group, :func:`bils.lattice.decode` of the codes."""
        out, n = self.codes.shape
        W = np.empty((out, n))
        for g in range(self.n_groups):
            a, b = self.group_bounds(g)
            cb = self.codebook(g)
            Z = self.codes[:, a:b].T.astype(np.int64) + int(cb.lo[0])
            W[:, a:b] = decode(cb, Z).T
        if self.col_scale is not None:
            W *= self.col_scale.astype(np.float64)[None, :]
        if self.row_scale is not None:
            W *= self.row_scale.astype(np.float64)[:, None]
        return W.astype(dtype)

    def storage_bits(self) -> int:
        """Bits of the stored format: codes, fp16 generators (and µ, range), fp16 scales."""
        out = self.codes.shape[0]
        widths = np.array([b - a for a, b in (self.group_bounds(g) for g in range(self.n_groups))])
        total = int(np.sum(widths * out * self.group_bits.astype(np.int64)))
        total += 16 * self.d * self.d * self.n_groups
        if self.mu is not None:
            total += 2 * 16 * self.n_groups
        for s in (self.row_scale, self.col_scale):
            if s is not None:
                total += 16 * s.size
        return total

    @property
    def bits_per_weight(self) -> float:
        """:meth:`storage_bits` / number of weights (bias excluded)."""
        return self.storage_bits() / self.codes.size

    # ----------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the layer (optional ones when present); see :meth:`metadata`."""
        arrays = {"codes": self.codes, "generators": self.generators, "group_bits": self.group_bits}
        for name in ("row_scale", "col_scale", "mu", "amax", "bias"):
            v = getattr(self, name)
            if v is not None:
                arrays[name] = v
        return arrays

    def metadata(self) -> dict:
        """The scalars of the layer (JSON): ``format``, ``d``, ``group_size``, ``offset``, ``stats``."""
        from ..formats._io import jsonable

        return {"format": "glvq", "d": self.d, "group_size": self.group_size, "offset": self.offset,
                "stats": jsonable(self.stats)}

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "LatticeLayer":
        """Inverse of :meth:`to_arrays` + :meth:`metadata`."""
        if meta.get("format") != "glvq":
            raise ValueError("`meta` does not describe a glvq layer")
        return cls(d=meta["d"], group_size=meta["group_size"], offset=meta["offset"], stats=meta["stats"],
                   **arrays)


# --------------------------------------------------------------------------- the method
def salience_bits(salience, bits, frac):
    """Bits per group: ``bits + 1`` for the ``round(frac * n)`` most salient groups,
    ``bits - 1`` for as many least salient ones, ``bits`` for the rest.

    Parameters
    ----------
    salience : (n_groups,) array_like
        Salience of each group (larger: more important); ties keep the group order.
    bits : int
        The average bits per weight :math:`b`.
    frac : float in [0, 0.5]
        Fraction of groups moved up (and as many moved down).

    Returns
    -------
    (n_groups,) ndarray of uint8

    Examples
    --------
    >>> salience_bits([5.0, 1.0, 3.0, 0.5, 2.0], 2, 0.2).tolist()
    [3, 2, 2, 1, 2]
    """
    s = np.asarray(salience, dtype=np.float64)
    out = np.full(s.size, bits, dtype=np.uint8)
    k = int(round(frac * s.size))
    if k:
        order = np.argsort(-s, kind="stable")
        out[order[:k]] = bits + 1
        out[order[::-1][:k]] = bits - 1  # argsort(-s)[::-1]: least salient first
    return out


def _fp16(a):
    return np.asarray(a, dtype=np.float16).astype(np.float64)


def quantize_weight_glvq(W, H, D=None, spec: GLVQSpec = GLVQSpec(), *, backend="auto", rng=None,
                         bias=None) -> LatticeLayer:
    r"""Quantize ``W`` (out, in) with grouped lattice VQ; pure, numpy in and out.

    Same call as :func:`llm_adapter.methods.uniform.quantize_weight`, so a calibration driver
    can dispatch on ``spec.method``.

    Parameters
    ----------
    W : (out, in) array_like or torch.Tensor
        Float weights; ``in`` a multiple of ``spec.d``.
    H : (in, in) array_like
        Input Gram (any positive normalisation), undamped.
    D : (in, in) array_like, optional
        Cross term :math:`(X - \tilde X)\tilde X^\top` (same normalisation as ``H``): with
        ``spec.alpha > 0`` the codes approximate the joint target
        :math:`W_\alpha = W + \alpha W D H_d^{-1}`; ignored when ``alpha = 0`` or ``None``.
    spec : GLVQSpec
    backend : str
        For the :mod:`bils` solvers; ``"auto"`` falls back to numpy when a compiled
        kernel is missing.
    rng : ignored
        glvq is deterministic; accepted for signature compatibility.
    bias : (out,) array_like, optional
        Stored as is.

    Returns
    -------
    LatticeLayer

    Notes
    -----
    With :math:`H_d = R^T R` (upper Cholesky, after the decision-order permutation), the
    residual target of group :math:`g` given the groups already decided is
    :math:`t_g = Y_g - R_{g,>g}\hat W_{>g}^T` (``Y = R W^T``), and the group problem is the
    lattice encoding of :math:`v = R_{gg}^{-1} t_g` under :math:`M_g = R_{gg}^T R_{gg}`
    (scaled by the row and column scales). The loss reported is
    :math:`\sum_j (w_j - \hat w_j)^T H_d (w_j - \hat w_j)` of the stored (fp16) format.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((64, 128)); X = rng.standard_normal((128, 512))
    >>> spec = GLVQSpec(bits=2, d=8, group_size=64, n_iter=3)
    >>> q = quantize_weight_glvq(W, X @ X.T, spec=spec, backend="numpy")
    >>> q.codes.shape, q.n_groups, int(q.codes.max()) <= 3, round(q.bits_per_weight, 3)
    ((64, 128), 2, True, 2.375)
    >>> bool(q.stats["rel_loss"] < 0.25)
    True
    """
    if not isinstance(spec, GLVQSpec):
        raise TypeError(f"`spec` must be a GLVQSpec, got {type(spec).__name__}")
    t0 = time.perf_counter()
    W = as_float64("W", W)
    if W is None or W.ndim != 2:
        raise ValueError("`W` must be a 2-D (out, in) array")
    out, n = W.shape
    if n % spec.d:
        raise ValueError(f"`W` must have a multiple of `d` = {spec.d} columns, got {n}")
    H = as_float64("H", H)
    if H is None or H.shape != (n, n):
        raise ValueError(f"`H` must be ({n}, {n}) to match `W` {W.shape}, got {None if H is None else H.shape}")
    if bias is not None:
        bias = as_float64("bias", bias).astype(np.float32).reshape(-1)

    # damping as GPTQ / bils.BILSProblem.from_gram: dead columns get H_ii = 1 and weight 0
    Hd, dead = damped_hessian(H, spec.damp)
    Wt = np.where(dead[None, :], 0.0, W)
    D = as_float64("D", D)
    if D is not None and D.shape != (n, n):
        raise ValueError(f"`D` must be ({n}, {n}) to match `W` {W.shape}, got {D.shape}")
    alpha = spec.alpha if D is not None else 0.0
    target = joint_target(Wt, Hd, D, alpha) if alpha else Wt

    gs, d = spec.group_size, spec.d
    bounds = [(a, min(n, a + gs)) for a in range(0, n, gs)]
    ng = len(bounds)

    rs = np.ones(out)
    if spec.row_scale:
        rs = _fp16(np.sqrt(np.mean(Wt * Wt, axis=1)))
        rs[rs == 0] = 1.0
    cs = np.ones(n)
    if spec.col_scale:
        cs = _fp16(np.sqrt(np.mean((Wt / rs[:, None]) ** 2, axis=0)))
        cs[cs == 0] = 1.0

    energy = np.diag(Hd) * np.sum(Wt * Wt, axis=0)  # H_ii ||W_:,i||^2
    g_energy = np.array([energy[a:b].sum() for a, b in bounds])
    # bits by energy per column, so that a short last group is not singled out
    gbits = salience_bits(g_energy / [b - a for a, b in bounds], spec.bits, spec.salience_frac)

    # decision order: solve position -> column; the last position is decided first
    if spec.order == "act":
        diagH = np.diag(Hd)
        perm = []
        for g in np.argsort(g_energy, kind="stable"):
            a, b = bounds[g]
            blocks = np.arange(a, b, d)
            key = [diagH[s:s + d].sum() for s in blocks]
            perm.extend(np.concatenate([np.arange(s, s + d) for s in blocks[np.argsort(key, kind="stable")]]))
        perm = np.asarray(perm)
        gorder = list(np.argsort(g_energy, kind="stable"))
    else:
        perm = np.arange(n)
        gorder = list(range(ng))
    R = scipy.linalg.cholesky(Hd[np.ix_(perm, perm)], lower=False)
    Y = R @ target[:, perm].T  # (n, out), solve order
    What = np.zeros((n, out))  # decided weights, solve order

    codes = np.empty((out, n), dtype=np.uint8)
    gens = np.empty((ng, d, d), dtype=np.float16)
    mus = np.empty(ng, dtype=np.float16) if spec.mu is not None else None
    amaxs = np.empty(ng, dtype=np.float16) if spec.mu is not None else None
    gains, edges = [], 0
    pos = 0
    starts = {}
    for g in gorder:
        starts[g] = pos
        pos += bounds[g][1] - bounds[g][0]
    be = backend
    for g in reversed(gorder):
        a, b = bounds[g]
        p0, p1 = starts[g], starts[g] + (b - a)
        cols = perm[p0:p1]  # original columns of this group, in solve order
        t = Y[p0:p1] - R[p0:p1, p1:] @ What[p1:]
        Rg = R[p0:p1, p0:p1] * cs[cols][None, :]
        V = scipy.linalg.solve_triangular(Rg, t, lower=False) / rs[None, :]
        # back to the storage layout: original column order inside the group
        inv = np.argsort(cols)
        V = V[inv]
        Rg = Rg[:, inv]
        M = Rg.T @ Rg
        M = 0.5 * (M + M.T)
        fit, be = _fit(V, int(gbits[g]), spec, M, rs * rs, be)
        cb = fit.codebook
        comp = {}
        if spec.mu is not None:
            comp = {"mu": float(_fp16(cb.mu)), "amax": float(_fp16(cb.amax))}
        cb16 = Codebook(_fp16(cb.G), cb.bits, offset=0.5, **comp)
        res, be = _encode(cb16, V, M, spec, be)
        Z = np.asarray(res.x)
        codes[:, a:b] = (Z - cb16.lo[0]).T.astype(np.uint8)
        gens[g] = cb16.G.astype(np.float16)
        if mus is not None:
            mus[g], amaxs[g] = cb16.mu, cb16.amax
        edges += int(np.sum((Z == cb16.lo[0]) | (Z == cb16.hi[0])))
        gains.append(fit.history[-1] / fit.history[0] if fit.history[0] > 0 else 1.0)
        Wg = decode(cb16, Z) * cs[a:b, None] * rs[None, :]  # (b - a, out), original order
        What[p0:p1] = Wg[np.argsort(inv)]

    layer = LatticeLayer(codes=codes, generators=gens, group_bits=gbits, d=d, group_size=gs,
                         row_scale=rs.astype(np.float16) if spec.row_scale else None,
                         col_scale=cs.astype(np.float16) if spec.col_scale else None,
                         mu=mus, amax=amaxs, offset=0.5, bias=bias)
    E = W - layer.dequantize(np.float64)
    E[:, dead] = 0.0
    loss = float(np.sum((E @ Hd) * E))
    ref = float(np.sum((Wt @ Hd) * Wt))
    layer.stats = {"method": "glvq", "encode": spec.encode, "fit_encode": spec.fit_encode or spec.encode,
                   "backend": be, "loss": loss,
                   "rel_loss": loss / ref if ref > 0 else 0.0, "bits_per_weight": layer.bits_per_weight,
                   "fit_gain": float(np.mean(gains)), "edge_frac": edges / codes.size, "alpha": float(alpha),
                   "time": time.perf_counter() - t0}
    return layer


def _fit(V, bits, spec, M, weights, backend):
    return with_fallback(lambda be: fit_generator(
        V, bits, d=spec.d, metric=M, weights=weights, n_iter=spec.n_iter, penalty=spec.penalty,
        sv_bounds=spec.sv_bounds, encode_method=spec.fit_encode or spec.encode, mu=spec.mu, beam_width=spec.beam_width,
        max_nodes=spec.max_nodes, backend=be), backend, "glvq")


def _encode(cb, V, M, spec, backend):
    return with_fallback(lambda be: encode(cb, V, M, method=spec.encode, beam_width=spec.beam_width,
                                            max_nodes=spec.max_nodes, backend=be), backend, "glvq")


# --------------------------------------------------------------------------- stored format
#: Optional fp16 arrays of a glvq layer, stored when present.
_LATTICE_OPTIONAL = ("row_scale", "col_scale", "mu", "amax")


def _write(name: str, layer, tensors: dict, **_options) -> dict:
    """Add the tensors of glvq layer `name` to `tensors`; return its metadata entry."""
    from ..formats._io import jsonable

    def bad(msg: str):
        raise QuantizedFormatError(f"layer {name!r}: {msg}")

    codes = np.asarray(layer.codes)
    gb = np.asarray(layer.group_bits)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        bad(f"`codes` must be a 2-D integer array, got {codes.dtype} with shape {codes.shape}")
    if gb.size == 0 or gb.min() < 1:
        bad("`group_bits` must be positive")
    out_f, in_f = codes.shape
    for g in range(layer.n_groups):
        a, b = layer.group_bounds(g)
        blk = codes[:, a:b]
        if blk.size and (blk.min() < 0 or blk.max() >= 1 << int(gb[g])):
            bad(f"`codes` of group {g} must lie in [0, {(1 << int(gb[g])) - 1}] (group_bits {int(gb[g])})")
    if not np.all(np.isfinite(np.asarray(layer.generators, dtype=np.float64))):
        bad("`generators` has non-finite entries")
    try:
        width = pack_width(int(gb.max()))
    except ValueError as err:
        bad(f"`group_bits`: {err}")
    tensors[f"{name}.lcodes"] = pack(codes, width, axis=1)
    tensors[f"{name}.generators"] = np.ascontiguousarray(layer.generators, dtype=np.float16)
    tensors[f"{name}.group_bits"] = np.ascontiguousarray(gb, dtype=np.uint8)
    for field in _LATTICE_OPTIONAL:
        v = getattr(layer, field)
        if v is not None:
            tensors[f"{name}.{field}"] = np.ascontiguousarray(v, dtype=np.float16)
    if layer.bias is not None:
        tensors[f"{name}.bias"] = np.ascontiguousarray(layer.bias)
    return {
        "kind": "glvq",
        "bits": sorted({int(b) for b in gb}),
        "pack_bits": width,
        "d": int(layer.d),
        "group_size": int(layer.group_size),
        "offset": float(layer.offset),
        "out_features": int(out_f),
        "in_features": int(in_f),
        "n_groups": int(layer.n_groups),
        "bias": layer.bias is not None,
        "optional": [f for f in _LATTICE_OPTIONAL if getattr(layer, f) is not None],
        "bits_per_weight": float(layer.bits_per_weight),
        "stats": jsonable(layer.stats),
    }


def _read(name: str, m: dict, get) -> LatticeLayer:
    """Rebuild glvq layer `name` from its metadata `m` and tensor getter `get`."""
    from ..formats.native import CONFIG_NAME, TENSORS_NAME

    try:
        width, d, gs = int(m["pack_bits"]), int(m["d"]), int(m["group_size"])
        out_f, in_f, n_groups = int(m["out_features"]), int(m["in_features"]), int(m["n_groups"])
        offset, optional = float(m["offset"]), list(m.get("optional") or [])
    except (KeyError, TypeError, ValueError) as err:
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} metadata is missing or has a bad field: {err}") from err
    if width not in SUPPORTED_BITS:
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} `pack_bits` must be one of {SUPPORTED_BITS}, got {width}")
    lcodes = get(name, "lcodes")
    want = (out_f, packed_length(in_f, width))
    if lcodes.dtype != np.int32 or lcodes.shape != want:
        raise QuantizedFormatError(f"{TENSORS_NAME}: layer {name!r} `lcodes` must be int32 {want}, got "
                                   f"{lcodes.dtype} {lcodes.shape}")
    arrays = {"generators": get(name, "generators"), "group_bits": get(name, "group_bits")}
    for field in optional:
        if field not in _LATTICE_OPTIONAL:
            raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} names an unknown tensor {field!r}")
        arrays[field] = get(name, field)
    try:
        layer = LatticeLayer(codes=unpack(lcodes, width, in_f, axis=1), d=d, group_size=gs, offset=offset,
                             bias=get(name, "bias", required=bool(m.get("bias"))),
                             stats=dict(m.get("stats") or {}), **arrays)
    except ValueError as err:
        raise QuantizedFormatError(f"{TENSORS_NAME}: glvq layer {name!r}: {err}") from err
    if layer.n_groups != n_groups:
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} `n_groups` {n_groups} does not match "
                                   f"its tensors ({layer.n_groups})")
    if layer.shape != (out_f, in_f):
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} shape {(out_f, in_f)} does not match "
                                   f"its tensors {layer.shape}")
    check_lattice_layer(name, layer, width, where=f"{TENSORS_NAME}: ")
    return layer


def check_lattice_layer(name: str, layer: LatticeLayer, width: int | None = None, where: str = "") -> None:
    """Raise :class:`~llm_adapter.errors.QuantizedFormatError` naming `name` and the field if
    glvq `layer` is not meaningful: ``group_bits`` in ``[1, width]`` (the packing width),
    codes of group ``g`` in ``[0, 2**group_bits[g] - 1]``, finite generators, scales and
    compander values (``mu``, ``amax`` positive), a finite bias."""
    def bad(msg: str):
        raise QuantizedFormatError(f"{where}glvq layer {name!r}: {msg}")

    gb = np.asarray(layer.group_bits).astype(np.int64)
    top = 8 if width is None else int(width)
    if gb.size == 0 or gb.min() < 1 or gb.max() > top:
        bad(f"`group_bits` must lie in [1, {top}], got range [{gb.min() if gb.size else '-'}, "
            f"{gb.max() if gb.size else '-'}]")
    codes = np.asarray(layer.codes)
    for g in range(layer.n_groups):
        a, b = layer.group_bounds(g)
        blk = codes[:, a:b]
        if blk.size and (blk.min() < 0 or blk.max() >= 1 << int(gb[g])):
            bad(f"`codes` of group {g} must lie in [0, {(1 << int(gb[g])) - 1}] (group_bits {int(gb[g])})")
    for field in ("generators", "row_scale", "col_scale", "mu", "amax", "bias"):
        v = getattr(layer, field)
        if v is not None and not np.all(np.isfinite(np.asarray(v, dtype=np.float64))):
            bad(f"`{field}` has non-finite entries")
    for field in ("mu", "amax"):
        v = getattr(layer, field)
        if v is not None and np.any(np.asarray(v, dtype=np.float64) <= 0):
            bad(f"`{field}` must be positive")
    if not np.isfinite(layer.offset):
        bad("`offset` must be finite")


#: glvq layers in the native format (kind ``"glvq"``, format version 2).
GLVQ_FORMAT = LayerFormat(kind="glvq", write=_write, read=_read, format_version=2)

def cli_options(parser) -> None:
    """The ``quantize`` options of glvq."""
    from ..cli.argtypes import nonneg_float, positive_int

    lat = parser.add_argument_group("glvq (with --method glvq)")
    lat.add_argument("--lattice-dim", type=positive_int, default=8,
                     help="lattice dimension d in {2, 4, 8, 16, 32} (default 8)")
    lat.add_argument("--encode", choices=ENCODE_METHODS, default="exact",
                     help="encoder of the stored codes (default exact; the generator is fitted with nearest plane)")
    lat.add_argument("--fit-iters", type=int, default=20, help="generator-fitting iterations per group (default 20)")
    lat.add_argument("--salience-frac", type=nonneg_float, default=0.0,
                     help="fraction of groups coded with bits+1 (as many get bits-1; default 0)")


def spec_from_cli(args) -> GLVQSpec:
    """:class:`GLVQSpec` from the parsed ``quantize`` arguments."""
    if args.group_size == -1:
        raise ParameterError("group_size", "glvq needs a positive group size (a multiple of --lattice-dim), not -1")
    return GLVQSpec(bits=args.bits, d=args.lattice_dim, group_size=args.group_size, encode=args.encode,
                    fit_encode="nearest_plane", n_iter=args.fit_iters, salience_frac=args.salience_frac,
                    damp=args.damp)


METHOD = register(Method(name="glvq", spec_type=GLVQSpec, quantize=quantize_weight_glvq, layer_type=LatticeLayer,
                         format=GLVQ_FORMAT, module="llm_adapter.nn.linear:LatticeLinear",
                         description="grouped lattice VQ, one generator per column group (GLVQ)",
                         cli_options=cli_options, spec_from_cli=spec_from_cli,
                         cli_flags={"d": "--lattice-dim", "n_iter": "--fit-iters"}))

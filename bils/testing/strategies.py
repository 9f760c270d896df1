r"""Hypothesis strategies for BILS problems, well posed by construction (no ``assume``).

Structure (sizes, conditioning, target kind, grid and box shapes, box widths) is drawn
by Hypothesis, so failing examples shrink to the smallest structure; the real numbers
are then generated from one drawn seed. ``R`` always has a safe diagonal:

* ``"well"``: :math:`|R_{ii}| \in [1/2, 2]`, off-diagonal entries in :math:`[-1/2, 1/2]`;
* ``"ill"``: :math:`|R_{ii}|` spans four decades, :math:`|R_{il}| \le \sqrt{|R_{ii} R_{ll}|}`.

Targets:

* ``"noiseless"``: ``Y = R (S∘x_true + O)`` with ``x_true`` in the box;
* ``"noisy"``: ``Y = R (S∘u + O)``, ``u`` a Gaussian perturbation of an integer point
  that may lie up to 2 outside the box;
* ``"ties"``: dyadic ``R`` (diagonal or triangular), grid and targets with coordinates at
  exact half-integers, so every solver's arithmetic is exact and rounding ties are real
  (``ProblemCase.exact`` is set).

Every strategy returns :class:`~bils.testing.ProblemCase` objects (or
:class:`LayerCase` for :func:`layer_problems`).

This module needs Hypothesis (``pip install 'bils[test]'``).
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "bils.testing.strategies needs Hypothesis: pip install 'bils[test]'") from exc

from dataclasses import dataclass

import numpy as np

from ._case import ProblemCase, format_array

__all__ = [
    "WIDTHS", "CONDITIONING", "TARGETS", "GRIDS", "BOX_SHAPES",
    "sizes", "seeds", "make_triangular", "triangular_factors", "boxes", "grids",
    "bils_problems", "shifts", "shifted_problems", "LayerCase", "layer_problems",
    "make_gram", "minmax_grid",
]

#: Box widths ``hi - lo`` drawn by default (1, 2, 4, 8, 16 points per coordinate).
WIDTHS = (0, 1, 3, 7, 15)
CONDITIONING = ("well", "ill")
TARGETS = ("noisy", "noiseless", "ties")
#: Grid kinds: no grid (``scale``/``offset`` None), one scalar, per coordinate (n, 1),
#: per RHS (1, k), per coordinate and RHS (n, k).
GRIDS = ("none", "scalar", "coordinate", "rhs", "full")
#: Box shapes, as for grids.
BOX_SHAPES = ("scalar", "coordinate", "rhs", "full")


def _shape(kind, n, k):
    return {"scalar": (1, 1), "coordinate": (n, 1), "rhs": (1, k), "full": (n, k)}[kind]


def sizes(*, min_n=1, max_n=6, min_k=1, max_k=3):
    """``(n, k)``: number of coordinates and of right-hand sides."""
    return st.tuples(st.integers(min_n, max_n), st.integers(min_k, max_k))


def seeds():
    """Seeds for the numerical data (shrink towards 0)."""
    return st.integers(0, 2**32 - 1)


def make_triangular(rng, n, conditioning="well", *, dyadic=False, diagonal=False):
    """An (n, n) upper-triangular ``R`` with a safe diagonal (plain function).

    ``dyadic=True`` gives entries that are small dyadic rationals (diagonal ``±2^e``),
    for problems on which every solver computes exactly.
    """
    if conditioning not in CONDITIONING:
        raise ValueError(f"`conditioning` must be one of {CONDITIONING}, got {conditioning!r}")
    sign = rng.choice([-1.0, 1.0], size=n)
    if dyadic:
        lo_e, hi_e = (-1, 1) if conditioning == "well" else (-6, 2)
        e = rng.integers(lo_e, hi_e + 1, size=n)
        d = sign * np.ldexp(1.0, e)
        R = np.diag(d)
        if not diagonal:
            m = rng.integers(-4, 5, size=(n, n)) / 4.0
            R += np.triu(m, 1) * np.ldexp(1.0, np.minimum(e[:, None], 0))
        return R
    if conditioning == "well":
        d = sign * 2.0 ** rng.uniform(-1.0, 1.0, size=n)
        off = rng.uniform(-0.5, 0.5, size=(n, n))
    else:
        d = sign * 10.0 ** rng.uniform(-2.5, 1.5, size=n)
        g = np.sqrt(np.abs(d[:, None] * d[None, :]))
        off = rng.uniform(-1.0, 1.0, size=(n, n)) * g
    return np.diag(d) + np.triu(off, 1)


@st.composite
def triangular_factors(draw, n=None, *, min_n=1, max_n=8, conditioning=CONDITIONING):
    """Upper-triangular ``R`` (n, n) with a safe diagonal, well- or ill-conditioned."""
    if n is None:
        n = draw(st.integers(min_n, max_n))
    cond = draw(st.sampled_from(conditioning))
    return make_triangular(np.random.default_rng(draw(seeds())), n, cond)


@st.composite
def boxes(draw, n, k, *, widths=WIDTHS, shapes=BOX_SHAPES, lo_range=(-8, 8),
          max_points=None):
    """``(lo, hi)`` int64 arrays of a box shape (scalar, per coordinate, per RHS, full).

    ``max_points`` caps the number of box points per RHS (for brute force); it is met
    by construction, coordinate by coordinate.
    """
    kind = draw(st.sampled_from(shapes))
    rows, cols = _shape(kind, n, k)
    widths = sorted(widths)
    W = np.zeros((rows, cols), dtype=np.int64)
    points = np.ones(cols)  # per column, over the coordinates drawn so far
    for i in range(rows):
        reps = n if rows == 1 else 1  # a scalar row covers all n coordinates
        for j in range(cols):
            ok = [w for w in widths if max_points is None
                  or points[j] * float(w + 1) ** reps <= max_points]
            W[i, j] = draw(st.sampled_from(ok or [0]))
            points[j] *= float(W[i, j] + 1) ** reps
    lo = np.array(draw(st.lists(st.integers(*lo_range), min_size=rows * cols,
                                max_size=rows * cols)), dtype=np.int64).reshape(rows, cols)
    return lo, lo + W


def _make_grid(rng, kind, n, k, dyadic):
    if kind == "none":
        return None, None
    shape = _shape(kind, n, k)
    if dyadic:
        scale = np.ldexp(1.0, rng.integers(-1, 2, size=shape))
        offset = rng.integers(-8, 9, size=shape) / 8.0
    else:
        scale = 2.0 ** rng.uniform(-2.0, 2.0, size=shape)
        offset = rng.uniform(-2.0, 2.0, size=shape)
    return scale, offset


@st.composite
def grids(draw, n, k, *, kinds=GRIDS, dyadic=False):
    """``(scale, offset)`` of a grid kind (``(None, None)`` for ``"none"``); scale > 0."""
    kind = draw(st.sampled_from(kinds))
    return _make_grid(np.random.default_rng(draw(seeds())), kind, n, k, dyadic)


@st.composite
def bils_problems(draw, *, min_n=1, max_n=6, min_k=1, max_k=3, conditioning=CONDITIONING,
                  targets=TARGETS, grid_kinds=GRIDS, box_shapes=BOX_SHAPES, widths=WIDTHS,
                  max_box_points=None, lo_range=(-8, 8)):
    """Multi-RHS BILS problems (:class:`~bils.testing.ProblemCase`).

    Parameters
    ----------
    min_n, max_n, min_k, max_k : int
        Sizes.
    conditioning : sequence of {"well", "ill"}
    targets : sequence of {"noisy", "noiseless", "ties"}
    grid_kinds : sequence of {"none", "scalar", "coordinate", "rhs", "full"}
    box_shapes : sequence of {"scalar", "coordinate", "rhs", "full"}
    widths : sequence of int
        Allowed ``hi - lo`` per coordinate.
    max_box_points : int, optional
        Keep the box small enough for brute force.
    """
    n, k = draw(sizes(min_n=min_n, max_n=max_n, min_k=min_k, max_k=max_k))
    target = draw(st.sampled_from(targets))
    cond = draw(st.sampled_from(conditioning))
    grid_kind = draw(st.sampled_from(grid_kinds))
    lo, hi = draw(boxes(n, k, widths=widths, shapes=box_shapes, lo_range=lo_range,
                        max_points=max_box_points))
    exact = target == "ties"
    diagonal = draw(st.booleans()) if exact else False
    rng = np.random.default_rng(draw(seeds()))

    R = make_triangular(rng, n, cond, dyadic=exact, diagonal=diagonal)
    scale, offset = _make_grid(rng, grid_kind, n, k, exact)
    S = np.broadcast_to(1.0 if scale is None else scale, (n, k))
    O = np.broadcast_to(0.0 if offset is None else offset, (n, k))
    LO, HI = np.broadcast_to(lo, (n, k)), np.broadcast_to(hi, (n, k))
    x_true = None
    if target == "noiseless":
        x_true = rng.integers(LO, HI + 1)
        u = x_true.astype(np.float64)
    elif target == "noisy":
        x0 = rng.integers(LO - 2, HI + 3)
        sigma = rng.choice([0.1, 0.35, 1.0])
        u = x0 + sigma * rng.standard_normal((n, k))
    else:  # ties: half-integers (mostly) around integers near the box, all dyadic
        x0 = rng.integers(LO - 1, HI + 2)
        u = x0 + np.where(rng.random((n, k)) < 0.75, 0.5, 0.0)
    Y = R @ (S * u + O)
    label = f"{cond}/{target}{'/diagonal' if diagonal else ''}/grid={grid_kind}"
    return ProblemCase(R, Y, lo, hi, scale, offset, x_true=x_true, label=label, exact=exact)


@st.composite
def shifts(draw, n, k, *, max_shift=3):
    """Integer translation vectors: (n,) per coordinate or (n, k) per RHS, not all zero."""
    per_rhs = draw(st.booleans()) if k > 1 else False
    size = n * k if per_rhs else n
    vals = draw(st.lists(st.integers(-max_shift, max_shift), min_size=size, max_size=size)
                .filter(lambda v: any(v)))
    t = np.array(vals, dtype=np.int64)
    return t.reshape(n, k) if per_rhs else t


@st.composite
def shifted_problems(draw, problems=None, *, max_shift=3):
    """``(case, shift)`` pairs for translation-equivariance checks."""
    case = draw(problems if problems is not None else bils_problems())
    return case, draw(shifts(case.n, case.k, max_shift=max_shift))


# --------------------------------------------------------------------------- layers
@dataclass(frozen=True, eq=False)
class LayerCase:
    r"""A layer-wise quantization problem: weights ``W`` (m, n), Gram ``H`` (n, n).

    The objective per output channel ``j`` is
    :math:`(w_j - \hat w_j)^\top H (w_j - \hat w_j)` with
    :math:`\hat w_{ji} = s_{ji} (q_{ji} - z_{ji})`, ``q`` integer in ``[0, 2^bits - 1]``
    and the min-max asymmetric grid ``scale``/``zero`` (m, n) of GPTQ's quantizer,
    per channel or per group of ``group_size`` input columns.
    """

    H: np.ndarray
    W: np.ndarray
    bits: int
    scale: np.ndarray
    zero: np.ndarray
    group_size: int | None
    damp: float
    label: str = ""

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def problem(self, ordering="natural"):
        """:meth:`bils.BILSProblem.from_gram` for this layer (targets ``W.T``)."""
        from bils.problem import BILSProblem

        S = self.scale.T
        return BILSProblem.from_gram(self.H, self.W.T, 0, self.maxq, scale=S,
                                     offset=-S * self.zero.T, damp=self.damp,
                                     ordering=ordering)

    def case(self) -> ProblemCase:
        """The layer as a plain (natural-order) :class:`~bils.testing.ProblemCase`."""
        p = self.problem()
        return ProblemCase(p.R, p.Y, p.lo, p.hi, p.scale, p.offset, label="layer/" + self.label)

    def __repr__(self):
        return (f"LayerCase(bits={self.bits}, group_size={self.group_size}, damp={self.damp}, "
                f"label={self.label!r}):\n    H = {format_array(self.H)}\n"
                f"    W = {format_array(self.W)}")


def minmax_grid(W, bits, group_size=None):
    """GPTQ's asymmetric min-max grid for ``W`` (m, n): ``(scale, zero)``, each (m, n)."""
    m, n = W.shape
    maxq = 2**bits - 1
    g = n if group_size is None else group_size
    scale = np.empty((m, n))
    zero = np.empty((m, n))
    for a in range(0, n, g):
        blk = W[:, a:a + g]
        xmin = np.minimum(blk.min(axis=1), 0.0)
        xmax = np.maximum(blk.max(axis=1), 0.0)
        both0 = (xmin == 0) & (xmax == 0)
        xmin[both0], xmax[both0] = -1.0, 1.0
        s = (xmax - xmin) / maxq
        scale[:, a:a + g] = s[:, None]
        zero[:, a:a + g] = np.round(-xmin / s)[:, None]
    return scale, zero


def make_gram(rng, n, *, n_samples=None, correlation=0.5, dead=0):
    """``H = X Xᵀ / N`` from correlated inputs with heavy-tailed per-feature scales."""
    N = n_samples or 2 * n + 8
    Z = rng.standard_normal((n, N))
    # AR(1)-style mixing gives neighbouring features correlation ~ `correlation`
    X = np.empty_like(Z)
    X[0] = Z[0]
    for i in range(1, n):
        X[i] = correlation * X[i - 1] + np.sqrt(1 - correlation**2) * Z[i]
    X *= np.exp(0.5 * rng.standard_normal(n))[:, None]
    if dead:
        X[rng.choice(n, size=min(int(dead), n), replace=False)] = 0.0
    H = X @ X.T / N
    return 0.5 * (H + H.T)


@st.composite
def layer_problems(draw, *, min_n=2, max_n=16, min_m=1, max_m=6, bits=(2, 3, 4),
                   group_sizes=(None, 2, 4), damp=(0.01, 0.1), dead=(0, 1)):
    """Layer-shaped problems from a Gram matrix (:class:`LayerCase`)."""
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(min_m, max_m))
    b = draw(st.sampled_from(bits))
    g = draw(st.sampled_from(group_sizes))
    dp = draw(st.sampled_from(damp))
    nd = draw(st.sampled_from(dead))
    rng = np.random.default_rng(draw(seeds()))
    H = make_gram(rng, n, dead=nd)
    W = rng.standard_normal((m, n)) * np.exp(0.3 * rng.standard_normal(m))[:, None]
    scale, zero = minmax_grid(W, b, g)
    return LayerCase(H, W, b, scale, zero, g, dp, label=f"bits={b}/group={g}/dead={nd}")

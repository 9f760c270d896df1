r"""Klein randomised nearest plane ("decoding by sampling") with a box."""

from __future__ import annotations

import math

import numpy as np

from ._driver import run_solver
from ._guard import _compact, scratch_iv, work_iv
from ._rng import column_seeds, uniform
from ._validate import _namespace, float_iv, int_iv
from .babai import box_round, nearest_plane_sweep
from .result import Status

__all__ = ["klein", "lls_tau"]

#: Window half-width of the discrete Gaussian in units of its standard deviation:
#: mass outside is below exp(-18) per level.
WINDOW_SIGMAS = 6.0


def lls_rho(n_samples: int, n: int) -> float:
    r"""Liu–Ling–Stehlé parameter :math:`\rho` solving :math:`K = (e\rho)^{2n/\rho}`, :math:`\rho > 1`."""
    logk = math.log(max(n_samples, 2))
    f = lambda r: (2.0 * n / r) * (1.0 + math.log(r)) - logk  # noqa: E731 - decreasing for r > 1
    lo, hi = 1.0, 2.0
    while f(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    # With few levels and many samples (2n <= log K) there is no root above 1; clamp so
    # that log(rho) >= 1 and the temperature stays finite.
    return max(hi, math.e)


def lls_tau(R, scale, n_samples):
    r"""Default temperature per RHS: :math:`\tau_j = \min_i (R_{ii} s_{ij})^2 / \log\rho`.

    This is Liu, Ling & Stehlé's choice :math:`A = \log\rho / \min_i r_{ii}^2` written as a
    temperature (:math:`P(x_i = z) \propto \exp(-A\, r_{ii}^2 (c_i - z)^2)`), with
    :math:`\rho` from :func:`lls_rho` for ``n_samples`` samples.
    """
    from ._grid import GroupedGrid

    if isinstance(scale, GroupedGrid):  # host problems: grids stay grouped
        R = np.asarray(R)
        dmin = scale.min_abs_scaled(np.diag(R))
        return dmin * dmin / math.log(lls_rho(n_samples, R.shape[0]))
    xp = _namespace(R)  # numpy, or cupy for device arrays
    R = xp.asarray(R)
    n = R.shape[0]
    d2 = (xp.diag(R)[:, None] * xp.asarray(scale)) ** 2
    return xp.min(d2, axis=0) / math.log(lls_rho(n_samples, n))


def _klein_numpy(can, *, n_samples, tau, seeds, block_size):
    lo, hi = can.lo, can.hi
    n, k = can.Y.shape
    x, cost = nearest_plane_sweep(can, block_size, lambda i, c, d: box_round(c, lo[i], hi[i]))
    improved = np.zeros(k, dtype=bool)
    sqrt_tau = np.sqrt(tau)
    for s in range(n_samples):
        def sample(i, c, d, s=s):
            m = box_round(c, lo[i], hi[i])
            width = (hi[i] - lo[i]).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                w = np.ceil(WINDOW_SIGMAS * sqrt_tau / np.abs(d)) + 1.0
            w = np.where(tau > 0, np.minimum(w, width), 0.0)
            wmax = int(w.max()) if k else 0
            offs = np.arange(-wmax, wmax + 1, dtype=np.float64)[:, None]
            z = m[None, :] + offs  # candidates ascending
            ok = (z >= lo[i]) & (z <= hi[i]) & (np.abs(offs) <= w[None, :])
            e = (d * (c - z)) ** 2
            e = np.where(ok, e, np.inf)
            emin = e.min(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(ok, np.exp(-(e - emin) / np.where(tau > 0, tau, 1.0)), 0.0)
            cum = np.cumsum(p, axis=0)
            u = uniform(seeds, s, i, n) * cum[-1]
            idx = np.argmax(cum > u[None, :], axis=0)
            pick = z[idx, np.arange(k)]
            return np.where(tau > 0, pick, m)

        xs, cs = nearest_plane_sweep(can, block_size, sample)
        better = cs < cost
        x[:, better] = xs[:, better]
        cost = np.where(better, cs, cost)
        improved |= better
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return x, cost, status, {"n_samples": n_samples, "tau": tau, "improved": improved,
                             "block_size": block_size}


def _klein_numba():
    from ._numba.klein import klein_kernel

    return klein_kernel


def _klein_cupy():
    from ._cuda.klein import klein_kernel

    return klein_kernel


KERNELS = {"numpy": lambda: _klein_numpy, "numba": _klein_numba, "cupy": _klein_cupy}


def klein(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None, n_samples=8, tau="auto",
          rng=None, block_size=128, backend="auto"):
    r"""Klein randomised nearest plane: best of Babai and ``n_samples`` sampled paths.

    Each sampled path runs the nearest-plane recursion but draws every coordinate from
    a discrete Gaussian around its centre, restricted to the box:

    .. math::

        P(x_i = z) \propto \exp\!\Big(-\frac{(R_{ii} s_i)^2 (c_i - z)^2}{\tau}\Big),
        \qquad lo_i \le z \le hi_i,

    and the point of least cost among the Babai point and all samples is returned, so
    the result is never worse than :func:`babai`. :math:`\tau \to 0` is Babai.

    Parameters
    ----------
    R, Y, lo, hi, scale, offset
        As in :func:`bils.babai` (or a :class:`~bils.BILSProblem` first).
    n_samples : int, default 8
        Sampled paths per RHS (``0`` returns the Babai point).
    tau : "auto" or float >= 0, default "auto"
        Temperature. ``"auto"`` is Liu–Ling–Stehlé's rule
        :math:`\tau_j = \min_i (R_{ii} s_{ij})^2 / \log\rho` (:func:`lls_tau`).
    rng : None, int or numpy.random.Generator
        Source of one 64-bit seed per RHS; samples are a pure function of that seed,
        the sample index and the level, so every backend and thread count gives the
        same result for the same ``rng``.
    block_size : int, default 128
        As in :func:`bils.babai`.
    backend : {"auto", "numpy", "numba", "cupy"}

    Returns
    -------
    BILSResult
        ``info["improved"]`` (k,) marks RHS where a sample beat Babai; ``info["tau"]``.

    Notes
    -----
    :math:`O(S n^2 k)` flops for ``S`` samples, embarrassingly parallel over samples
    and RHS. Candidates are the box integers within ``6 sqrt(tau) / |R_ii s_i|`` of the
    rounded centre, drawn by inverse CDF in ascending order.

    References
    ----------
    .. [1] P. Klein, "Finding the closest lattice vector when it's unusually close",
       SODA 2000.
    .. [2] S. Liu, C. Ling, D. Stehlé, "Decoding by sampling: a randomized lattice
       algorithm for bounded distance decoding", IEEE Trans. IT 57 (2011).

    Examples
    --------
    >>> import numpy as np, bils
    >>> rng = np.random.default_rng(0)
    >>> R = np.triu(rng.standard_normal((8, 8))) + 2 * np.eye(8)
    >>> Y = rng.standard_normal((8, 5)) * 4
    >>> kl = bils.klein(R, Y, -4, 4, n_samples=16, rng=1, backend="numpy")
    >>> bool(np.all(kl.cost <= bils.babai(R, Y, -4, 4, backend="numpy").cost))
    True
    """
    n_samples = int_iv("n_samples", n_samples, minimum=0)
    block_size = int_iv("block_size", block_size, minimum=1)
    if not (isinstance(tau, str) and tau == "auto"):
        tau = float_iv("tau", tau)
        if tau < 0:
            raise ValueError(f"`tau` must be 'auto' or a float >= 0, got {tau}")
    try:
        gen = np.random.default_rng(rng)
    except (TypeError, ValueError):
        raise TypeError("`rng` must be None, a non-negative int or a numpy.random.Generator") from None
    return run_solver("klein", KERNELS, R, Y, lo, hi, scale, offset, backend,
                      _KleinOptions(gen, n_samples, tau, block_size))


class _KleinOptions:
    """Kernel options of one :func:`klein` call, per (sub)problem ``can`` and columns ``cols``.

    The seeds of all ``k_total`` right-hand sides are drawn from the generator once, in
    column order, the first time they are needed; a sub-problem gets the slice of its
    global columns, so a result does not depend on how the columns are split (per-RHS
    orderings, dask chunks). :meth:`rhs_arrays` lets the dask driver draw them up front
    and ship each chunk its slice; pickled copies (dask tasks) drop the generator and
    the seeds and must be called with ``seeds=``.
    """

    def __init__(self, gen, n_samples, tau, block_size):
        self.gen, self.n_samples, self.tau, self.block_size = gen, n_samples, tau, block_size
        self.seeds = None

    def rhs_arrays(self, k_total):
        """Per-RHS arrays drawn once by the caller, (k_total,) each."""
        if self.seeds is None:
            if self.gen is None:
                raise RuntimeError("klein options were copied without their generator; pass `seeds`")
            self.seeds = column_seeds(self.gen, k_total)
        return {"seeds": self.seeds}

    def __call__(self, can, cols, k_total, seeds=None):
        if seeds is None:
            seeds = self.rhs_arrays(k_total)["seeds"][cols]
        xp = _namespace(can.R)
        t = (xp.broadcast_to(xp.asarray(lls_tau(can.R, can.scale, self.n_samples)), (can.k,))
             if self.tau == "auto" else xp.full(can.k, self.tau))
        if xp is np:
            _klein_work_iv(can, self.n_samples, t)
        return {"n_samples": self.n_samples, "tau": xp.asarray(t, dtype=np.float64),
                "seeds": seeds, "block_size": self.block_size}

    def __getstate__(self):
        return dict(self.__dict__, gen=None, seeds=None)


def _klein_work_iv(can, n_samples, tau):
    """Refuse, before sampling, windows or sample counts whose memory or work cannot fit.

    The window half-width at level ``i`` is ``min(ceil(6 sqrt(tau) / |R_ii s_i|) + 1,
    hi - lo)``; the numpy reference holds ``(2w + 1) k`` candidates per level (about 48
    bytes each) and every backend may visit them: work per RHS
    ``n_samples * n * (n + 2w + 1)``. With a grouped grid the widest window is bounded
    from the smallest level weight per RHS (never an (n, k) temporary).
    """
    from ._grid import GroupedGrid

    if n_samples == 0:
        return
    n, k = can.Y.shape
    diag = np.abs(np.diag(can.R))
    if isinstance(can.scale, GroupedGrid):
        d = np.atleast_1d(can.scale.min_abs_scaled(diag))[None, :]
    else:
        d = diag[:, None] * np.abs(_compact(can.scale))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        w = np.ceil(WINDOW_SIGMAS * np.sqrt(np.asarray(tau, dtype=np.float64)) / d) + 1.0
    w = np.where(np.isfinite(w), w, np.inf)
    wmax = min(float(np.max(w)), float(np.max(_compact(can.hi) - _compact(can.lo))))
    what = f"`klein` with `n_samples`={n_samples}, `tau` up to {float(np.max(tau)):.3g} and n={n}"
    hint = "lower `tau` (its window is 6 sqrt(tau) / |R_ii scale_i| integers wide) or `n_samples`"
    scratch_iv(what, 48.0 * (2 * wmax + 1) * k, hint)
    work_iv(what, float(n_samples) * n * (n + 2 * wmax + 1), hint)

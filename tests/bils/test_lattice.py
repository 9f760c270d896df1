"""Tests of bils.lattice: encoders against brute force, guarantees, fitting, companding."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bils
from bils.lattice import Codebook, compand, decode, default_box, encode, expand, fit_generator

BE = "numpy"


# ---------------------------------------------------------------------------- helpers
def _spd(rng, n, cond=30.0):
    """A random SPD matrix with a bounded condition number."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.exp(rng.uniform(0.0, np.log(cond), n))
    return (Q * ev) @ Q.T


def _generator(rng, d):
    """A random, reasonably conditioned generator."""
    return rng.standard_normal((d, d)) + 1.5 * np.eye(d)


def _metric_cost(cb, V, M, Z):
    E = V - decode(cb, Z)
    return np.einsum("ij,ij->j", E, M @ E)


def _brute_force(cb, V, M):
    """Smallest metric distance over every code of the box (n = d only)."""
    d = cb.d
    pts = np.array(list(itertools.product(*[range(cb.lo[i], cb.hi[i] + 1) for i in range(d)]))).T
    P = decode(cb, pts)  # (d, P)
    best = np.empty(V.shape[1])
    for j in range(V.shape[1]):
        E = V[:, j:j + 1] - P
        best[j] = np.min(np.einsum("ij,ij->j", E, M @ E))
    return best


@st.composite
def lattice_cases(draw, max_d=4, max_bits=2, blocks=1):
    """(codebook, V, metric): sizes first, then one seed for all the numbers."""
    d = draw(st.integers(1, max_d))
    bits = draw(st.integers(1, max_bits))
    m = draw(st.integers(1, blocks))
    offset = draw(st.sampled_from([0.0, 0.5]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cb = Codebook(_generator(rng, d), bits, offset=offset)
    n = m * d
    # targets around (and a bit beyond) the box so that clipping happens
    lo, hi = np.tile(cb.lo, m), np.tile(cb.hi, m)
    U = rng.uniform(lo - 1.0, hi + 1.0, size=(4, n)).T
    V = np.kron(np.eye(m), cb.G) @ U
    return cb, V, _spd(rng, n)


# ---------------------------------------------------------------------------- codebook
def test_codebook_defaults_and_readonly():
    cb = Codebook(np.eye(3), 3)
    assert (cb.d, cb.bits) == (3, 3)
    assert cb.lo.tolist() == [-4] * 3 and cb.hi.tolist() == [3] * 3
    assert cb.offset.tolist() == [0.5] * 3 and not cb.companded
    assert default_box(1) == (-1, 0)
    with pytest.raises(ValueError):
        cb.G[0, 0] = 2.0
    cb2 = cb.replace(offset=0.0, lo=0, hi=7)
    assert cb2.lo.tolist() == [0] * 3 and cb2.offset.tolist() == [0.0] * 3
    # symmetric grid: decode(-1 - z) = -decode(z) with the default box and offset
    z = np.array([-4, 0, 3])
    np.testing.assert_allclose(decode(cb, -1 - z), -decode(cb, z))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"G": np.ones((2, 3)), "bits": 2}, ValueError, r"`G` must be a square"),
    ({"G": [[1.0, 2.0], [2.0, 4.0]], "bits": 2}, ValueError, r"`G` must be non-singular"),
    ({"G": [[1.0, np.nan], [0.0, 1.0]], "bits": 2}, ValueError, r"`G` must be finite"),
    ({"G": np.eye(2), "bits": 0}, ValueError, r"`bits` must be >= 1"),
    ({"G": np.eye(2), "bits": 2.0}, TypeError, r"`bits` must be an integer"),
    ({"G": np.eye(2), "bits": 2, "lo": 1, "hi": 0}, ValueError, r"`lo` must not exceed `hi`"),
    ({"G": np.eye(2), "bits": 2, "lo": 0, "hi": 4}, ValueError, r"at most 2\*\*bits = 4"),
    ({"G": np.eye(2), "bits": 2, "lo": [0, 0, 0]}, ValueError, r"`lo` must be a scalar or have shape \(2,\)"),
    ({"G": np.eye(2), "bits": 2, "lo": 0.5}, ValueError, r"`lo` must hold finite integers"),
    ({"G": np.eye(2), "bits": 2, "offset": [0.1, 0.2, 0.3]}, ValueError, r"`offset` must be a scalar"),
    ({"G": np.eye(2), "bits": 2, "mu": 10.0}, ValueError, r"`mu` and `amax` must be given together"),
    ({"G": np.eye(2), "bits": 2, "mu": -1.0, "amax": 1.0}, ValueError, r"`mu` must be > 0"),
])
def test_codebook_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Codebook(**kwargs)


def test_replace_rejects_unknown_field():
    with pytest.raises(TypeError, match="unknown Codebook field"):
        Codebook(np.eye(2), 2).replace(bitz=3)


# ---------------------------------------------------------------------------- encode
def test_encode_validation():
    cb = Codebook(np.eye(2), 2)
    V = np.zeros((4, 3))
    with pytest.raises(TypeError, match="`codebook` must be a bils.Codebook"):
        encode(np.eye(2), V)
    with pytest.raises(ValueError, match=r"`V` must have a positive multiple of d = 2 rows, got 3"):
        encode(cb, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"`V` must be finite"):
        encode(cb, np.full((2, 1), np.inf))
    with pytest.raises(ValueError, match=r"`metric` must have shape \(4, 4\)"):
        encode(cb, V, np.eye(2))
    with pytest.raises(ValueError, match=r"`metric` must be symmetric"):
        encode(cb, V, np.triu(np.ones((4, 4))))
    with pytest.raises(ValueError, match=r"`metric` must be positive definite"):
        encode(cb, V, -np.eye(4))
    with pytest.raises(ValueError, match=r"`method` must be one of"):
        encode(cb, V, method="babai")
    with pytest.raises(ValueError, match=r"`beam_width` must be >= 1"):
        encode(cb, V, method="kbest", beam_width=0)
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        encode(cb, V, method="round_off", backend="gpu")
    with pytest.raises(TypeError, match="unexpected keyword"):
        encode(cb, V, methd="exact")


@settings(max_examples=60)
@given(lattice_cases())
def test_exact_equals_brute_force(case):
    cb, V, M = case
    res = encode(cb, V, M, method="exact", backend=BE)
    assert res.all_optimal
    np.testing.assert_allclose(res.cost, _brute_force(cb, V, M), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.cost, _metric_cost(cb, V, M, res.x), rtol=1e-9, atol=1e-9)


@settings(max_examples=60)
@given(lattice_cases(max_d=3, blocks=3))
def test_cost_identity_box_and_order_guarantees(case):
    cb, V, M = case
    out = {m: encode(cb, V, M, method=m, beam_width=4, backend=BE)
           for m in ("round_off", "nearest_plane", "kbest", "exact")}
    n = V.shape[0]
    lo, hi = np.tile(cb.lo, n // cb.d)[:, None], np.tile(cb.hi, n // cb.d)[:, None]
    for r in out.values():
        assert r.x.shape == V.shape and r.x.dtype == np.int64
        assert np.all((r.x >= lo) & (r.x <= hi))
        np.testing.assert_allclose(r.cost, _metric_cost(cb, V, M, r.x), rtol=1e-9, atol=1e-9)
    tol = 1e-9 * (1 + out["nearest_plane"].cost)
    assert np.all(out["kbest"].cost <= out["nearest_plane"].cost + tol)  # Babai path kept
    if n == cb.d:  # a single block: exact is the global optimum
        assert np.all(out["exact"].cost <= out["kbest"].cost + tol)
        assert np.all(out["exact"].cost <= out["round_off"].cost + tol)


def test_kbest_width_one_is_nearest_plane():
    rng = np.random.default_rng(3)
    cb = Codebook(_generator(rng, 4), 2)
    V = rng.standard_normal((8, 50)) * 2
    M = _spd(rng, 8)
    a = encode(cb, V, M, method="kbest", beam_width=1, backend=BE)
    b = encode(cb, V, M, method="nearest_plane", backend=BE)
    np.testing.assert_array_equal(a.x, b.x)


def test_round_off_is_glvq_rounding_without_metric():
    rng = np.random.default_rng(4)
    cb = Codebook(_generator(rng, 5), 3, offset=0.5)
    V = rng.standard_normal((5, 200)) * 3
    z = np.clip(np.floor(np.linalg.solve(cb.G, V) - 0.5 + 0.5), cb.lo[:, None], cb.hi[:, None])
    np.testing.assert_array_equal(encode(cb, V, method="round_off").x, z)


def test_multi_rhs_equals_loop_and_1d_input():
    rng = np.random.default_rng(5)
    cb = Codebook(_generator(rng, 2), 2)
    V = rng.standard_normal((4, 6))
    M = _spd(rng, 4)
    for m in ("round_off", "nearest_plane", "kbest", "exact"):
        full = encode(cb, V, M, method=m, backend=BE)
        for j in range(V.shape[1]):
            one = encode(cb, V[:, j], M, method=m, backend=BE)
            assert one.x.shape == (4,) and one.cost.shape == ()
            np.testing.assert_array_equal(one.x, full.x[:, j])
            assert one.cost == pytest.approx(full.cost[j])


@pytest.mark.parametrize("method", ["round_off", "nearest_plane", "kbest", "exact"])
@pytest.mark.parametrize("mu", [None, 30.0])
def test_round_trip_on_lattice(method, mu):
    """Encoding a reproduction point returns its code (any method, metric, compander)."""
    rng = np.random.default_rng(6)
    d, m, bits = 4, 2, 2
    cb = Codebook(_generator(rng, d), bits, mu=mu, amax=None if mu is None else 5.0)
    lo, hi = np.tile(cb.lo, m)[:, None], np.tile(cb.hi, m)[:, None]
    Z = rng.integers(lo, hi + 1, size=(d * m, 40))
    V = decode(cb, Z)
    res = encode(cb, V, _spd(rng, d * m), method=method, backend=BE)
    np.testing.assert_array_equal(res.x, Z)
    np.testing.assert_allclose(res.cost, 0.0, atol=1e-18 + 1e-20 * np.abs(V).max())


def test_nearest_plane_not_pointwise_better_than_round_off():
    """The documented caveat: a vector where round-off beats nearest plane."""
    cb = Codebook([[1.0, 0.6, 0.2], [0.0, 1.0, 0.7], [0.0, 0.0, 0.6]], 4, offset=0.0)
    v = np.array([-0.49, 1.59, 1.5])
    ro = encode(cb, v, method="round_off")
    npl = encode(cb, v, method="nearest_plane", backend=BE)
    assert ro.cost < npl.cost


@pytest.mark.parametrize("d", [2, 4, 8])
def test_nearest_plane_better_than_round_off_on_average(d):
    r"""Uniform modulo the lattice, inside the box: E cost = Σ R_ii²/12 vs ||C G||_F²/12."""
    rng = np.random.default_rng(10 + d)
    cb = Codebook(_generator(rng, d), 5)
    M = _spd(rng, d)
    N = 20000
    Z = rng.integers(-8, 8, size=(d, N))  # far from the faces of [-16, 15]
    V = cb.G @ (Z + 0.5 + rng.uniform(-0.5, 0.5, size=(d, N)))
    ro = encode(cb, V, M, method="round_off").cost.mean()
    npl = encode(cb, V, M, method="nearest_plane", backend=BE).cost.mean()
    C = np.linalg.cholesky(M).T
    R = np.linalg.qr(C @ cb.G)[1]
    np.testing.assert_allclose(npl, np.sum(np.diag(R) ** 2) / 12, rtol=0.05)
    np.testing.assert_allclose(ro, np.sum((C @ cb.G) ** 2) / 12, rtol=0.05)
    assert npl <= ro


# ---------------------------------------------------------------------------- decode
def test_decode_validation_and_blocks():
    cb = Codebook([[2.0, 1.0], [0.0, 1.0]], 2)
    with pytest.raises(ValueError, match=r"`Z` must lie inside the codebook box"):
        decode(cb, [2, 0])
    with pytest.raises(ValueError, match=r"`Z` must hold integers"):
        decode(cb, [0.5, 0.0])
    with pytest.raises(ValueError, match=r"`Z` must have a positive multiple of d = 2 rows"):
        decode(cb, [0, 0, 0])
    Z = np.array([[0, 1], [1, -2], [-2, 0], [0, 0]])
    out = decode(cb, Z)
    np.testing.assert_allclose(out[:2], cb.G @ (Z[:2] + 0.5))
    np.testing.assert_allclose(out[2:], cb.G @ (Z[2:] + 0.5))


# ---------------------------------------------------------------------------- µ-law
@given(st.floats(1.0, 255.0), st.floats(1e-3, 1e3), st.integers(0, 2**32 - 1))
def test_compand_round_trip(mu, amax, seed):
    x = np.random.default_rng(seed).uniform(-1.5, 1.5, 50) * amax
    y = compand(x, mu, amax)
    np.testing.assert_allclose(expand(y, mu, amax), x, rtol=1e-9, atol=1e-12 * amax)
    assert np.all(np.diff(compand(np.sort(x), mu, amax)) >= 0)  # monotone
    np.testing.assert_allclose(compand([-amax, 0.0, amax], mu, amax), [-amax, 0.0, amax])


def test_compand_validation():
    with pytest.raises(ValueError, match=r"`mu` must be > 0"):
        compand([1.0], 0.0, 1.0)
    with pytest.raises(ValueError, match=r"`amax` must be > 0"):
        expand([1.0], 10.0, -1.0)


# ---------------------------------------------------------------------------- fitting
def _data(rng, d, N, m=1):
    A = rng.standard_normal((d, d))
    L = np.linalg.cholesky(A @ A.T / d + 0.2 * np.eye(d))
    V = np.kron(np.eye(m), L) @ rng.standard_normal((m * d, N))
    return V * np.abs(rng.standard_normal((1, N)))  # heavier tails than a Gaussian


@settings(max_examples=15)
@given(st.sampled_from(["round_off", "nearest_plane", "kbest", "exact"]),
       st.integers(1, 2), st.integers(1, 2), st.integers(0, 2**32 - 1))
def test_fit_history_decreases_and_matches_encode(method, bits, m, seed):
    rng = np.random.default_rng(seed)
    d = 3
    V = _data(rng, d, 150, m)
    M = _spd(rng, m * d)
    fit = fit_generator(V, bits, d=d, metric=M, n_iter=4, encode_method=method, beam_width=3,
                        penalty=1e-2, backend=BE)
    h = fit.history
    assert len(h) >= 1 and np.all(np.diff(h) < 0)
    res = encode(fit.codebook, V, M, method=method, beam_width=3, backend=BE)
    np.testing.assert_array_equal(res.x, fit.x)
    np.testing.assert_allclose(res.cost, fit.cost, rtol=1e-9)
    # the reported loss: mean metric distance + penalty toward the initial generator
    assert fit.loss >= fit.cost.mean() - 1e-12
    assert fit.info["stopped"] in ("n_iter", "no_decrease")


def test_fit_exact_improves_on_initialisation():
    rng = np.random.default_rng(11)
    V = _data(rng, 4, 600)
    M = _spd(rng, 4)
    fit = fit_generator(V, 2, d=4, metric=M, n_iter=6, encode_method="exact", backend=BE)
    assert fit.history[-1] < 0.9 * fit.history[0]
    # with exact encoding every LS step is a descent step: no rejection
    assert fit.info["n_rejected"] == 0 and len(fit.history) == 7


def test_fit_singular_value_bounds_and_weights():
    rng = np.random.default_rng(12)
    V = _data(rng, 2, 300)
    fit0 = fit_generator(V, 2, d=2, n_iter=0, encode_method="exact", backend=BE)
    s0 = np.linalg.svd(fit0.codebook.G, compute_uv=False)
    fit = fit_generator(V, 2, d=2, n_iter=8, sv_bounds=(0.9, 1.1), encode_method="exact",
                        penalty=0.0, backend=BE)
    s = np.linalg.svd(fit.codebook.G, compute_uv=False)
    assert s.min() >= 0.9 * s0.min() - 1e-9 and s.max() <= 1.1 * s0.max() + 1e-9
    w = rng.uniform(0, 2, V.shape[1])
    fw = fit_generator(V, 2, d=2, n_iter=3, weights=w, backend=BE)
    assert np.all(np.diff(fw.history) < 0)


def test_fit_weighted_loss_value():
    rng = np.random.default_rng(13)
    V = _data(rng, 2, 200)
    w = rng.uniform(0, 2, V.shape[1])
    fit = fit_generator(V, 2, d=2, n_iter=0, weights=w, penalty=0.0, backend=BE)
    assert fit.loss == pytest.approx(w @ fit.cost / w.sum(), rel=1e-12)


def test_fit_companded():
    rng = np.random.default_rng(14)
    V = rng.standard_t(3, size=(4, 400))
    fit = fit_generator(V, 2, d=4, mu=20.0, n_iter=3, backend=BE)
    cb = fit.codebook
    assert cb.companded and cb.amax == pytest.approx(np.abs(V).max())
    np.testing.assert_array_equal(encode(cb, V, backend=BE).x, fit.x)
    # the loss lives in the companded domain
    E = compand(V, cb.mu, cb.amax) - cb.G @ (fit.x + 0.5)
    np.testing.assert_allclose(fit.cost, np.sum(E * E, axis=0), rtol=1e-9)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"d": 3}, ValueError, r"`V` must have a positive multiple of d = 3 rows"),
    ({"d": 2, "n_iter": -1}, ValueError, r"`n_iter` must be >= 0"),
    ({"d": 2, "penalty": -1.0}, ValueError, r"`penalty` must be >= 0"),
    ({"d": 2, "sv_bounds": (2.0, 3.0)}, ValueError, r"`sv_bounds` must be None or \(lo, hi\)"),
    ({"d": 2, "encode_method": "greedy"}, ValueError, r"`encode_method` must be one of"),
    ({"d": 2, "weights": np.ones(3)}, ValueError, r"`weights` must be finite, >= 0"),
    ({"d": 2, "G0": np.eye(3)}, ValueError, r"`G0` must have shape \(2, 2\)"),
    ({"d": 2, "metric": np.eye(3)}, ValueError, r"`metric` must have shape \(4, 4\)"),
])
def test_fit_validation(kwargs, exc, match):
    V = np.random.default_rng(0).standard_normal((4, 10))
    with pytest.raises(exc, match=match):
        fit_generator(V, 2, **kwargs)


def test_public_api():
    assert bils.Codebook is Codebook and bils.fit_generator is fit_generator
    assert bils.lattice.encode is encode


@pytest.mark.parametrize("method", ["nearest_plane", "kbest", "exact"])
def test_numba_backend_matches_numpy(method):
    pytest.importorskip("numba")
    rng = np.random.default_rng(15)
    cb = Codebook(_generator(rng, 4), 2)
    V = rng.standard_normal((8, 60)) * 2
    M = _spd(rng, 8)
    a = encode(cb, V, M, method=method, beam_width=4, backend="numpy")
    b = encode(cb, V, M, method=method, beam_width=4, backend="numba")
    assert b.backend == "numba"
    np.testing.assert_allclose(b.cost, a.cost, rtol=1e-9, atol=1e-12)

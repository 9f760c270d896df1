"""The array-API twins of :meth:`bils.BILSProblem.from_gram` and :func:`bils.joint_target`
(what runs on CuPy arrays) checked with ``xp = numpy`` against the host implementations."""

from __future__ import annotations

import numpy as np
import pytest

import bils
from bils.problem import BILSProblem
from bils.targets import _joint_target_xp, joint_target


def _layer(n=24, m=7, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3 * n))
    X[list(dead)] = 0.0
    H = X @ X.T / X.shape[1]
    W = rng.standard_normal((m, n))
    S = rng.uniform(0.05, 0.2, (n, m))
    return H, W, S, -S * 7


@pytest.mark.parametrize("ordering", ["natural", "diag", "reverse"])
@pytest.mark.parametrize("dead", [(), (3, 10)])
def test_from_gram_twin_equals_host(ordering, dead):
    H, W, S, O = _layer(dead=dead)
    host = BILSProblem.from_gram(H, W.T, 0, 15, scale=S, offset=O, damp=0.01, ordering=ordering)
    twin = BILSProblem._from_gram_xp(np, H, W.T, 0, 15, scale=S, offset=O, damp=0.01, ordering=ordering)
    if host.perm is None:
        assert twin.perm is None
    else:
        np.testing.assert_array_equal(twin.perm, host.perm)
    np.testing.assert_allclose(twin.R, host.R, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(twin.Y, host.Y, rtol=1e-10, atol=1e-10)
    for f in ("lo", "hi", "scale", "offset"):
        np.testing.assert_array_equal(np.broadcast_to(getattr(twin, f), host.Y.shape),
                                      np.broadcast_to(getattr(host, f), host.Y.shape))
    np.testing.assert_array_equal(twin.dead, host.dead)
    a, b = bils.babai(host, backend="numpy"), bils.babai(twin, backend="numpy")
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_allclose(a.cost, b.cost, rtol=1e-9)


def test_from_gram_twin_errors_name_the_argument():
    H, W, S, O = _layer()
    with pytest.raises(ValueError, match="`ordering` must be 'natural' or one of"):
        BILSProblem._from_gram_xp(np, H, W.T, 0, 15, ordering="sqrd")
    with pytest.raises(ValueError, match="`H` must be symmetric"):
        BILSProblem._from_gram_xp(np, H + np.triu(np.ones_like(H), 1), W.T, 0, 15)
    with pytest.raises(ValueError, match="positive definite"):
        BILSProblem._from_gram_xp(np, -np.eye(4), np.ones((4, 2)), 0, 15)
    with pytest.raises(ValueError, match="`T` must have"):
        BILSProblem._from_gram_xp(np, H, W, 0, 15)
    with pytest.raises(ValueError, match="`scale` of shape"):
        BILSProblem._from_gram_xp(np, H, W.T, 0, 15, scale=np.ones((3, 3)))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_joint_target_twin_equals_host(alpha):
    rng = np.random.default_rng(1)
    H, W, _, _ = _layer(seed=1)
    H = H + 0.01 * np.mean(np.diag(H)) * np.eye(H.shape[0])
    D = 0.1 * rng.standard_normal(H.shape)
    np.testing.assert_allclose(_joint_target_xp(np, W, H, D, alpha), joint_target(W, H, D, alpha),
                               rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="`D` must be"):
        _joint_target_xp(np, W, H, D[:3], alpha)


def test_joint_target_twin_rejects_an_indefinite_h():
    with pytest.raises(ValueError, match="`H` must be positive definite"):
        _joint_target_xp(np, np.ones((2, 3)), -np.eye(3), np.zeros((3, 3)), 0.5)

"""Row-split layer solves on a 2-process LocalCluster == the local ``quantize_weight``, bit for bit."""

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from llm_adapter import QuantSpec, quantize_weight  # noqa: E402
from llm_adapter.distributed import ClusterLostError, LayerSolveExecutor, row_blocks  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                       dashboard_address=None, host="127.0.0.1", timeout=TIMEOUT)
    c = distributed.Client(cluster, timeout=TIMEOUT)
    try:
        c.wait_for_workers(2, timeout=TIMEOUT)
        yield c
    finally:
        c.close(timeout=TIMEOUT)
        cluster.close(timeout=TIMEOUT)


def _layer(seed=0, m=70, n=48):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)).astype(np.float32)
    X = rng.standard_normal((n, 3 * n))
    Xt = X + 0.2 * rng.standard_normal(X.shape)
    H = Xt @ Xt.T / X.shape[1]
    H[5], H[:, 5] = 0.0, 0.0  # a dead input column
    D = (X - Xt) @ Xt.T / X.shape[1]
    bias = rng.standard_normal(m)
    return W, H, D, bias


def _assert_same_layer(remote, local):
    for field in ("codes", "scales", "zeros", "g_idx", "perm", "bias"):
        a, b = getattr(remote, field), getattr(local, field)
        if b is None:
            assert a is None, field
        else:
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)
    assert (remote.bits, remote.group_size) == (local.bits, local.group_size)
    for key in ("loss", "rel_loss", "objective", "babai_bound", "clipped_frac"):
        if local.stats.get(key) is None:
            assert remote.stats.get(key) is None, key
        else:
            assert remote.stats[key] == pytest.approx(local.stats[key], rel=1e-9, abs=1e-12), key
    assert remote.stats["method"] == local.stats["method"]
    assert remote.stats["alpha"] == local.stats["alpha"]


SPECS = [
    ("gptq", dict(bits=3, group_size=16, method="gptq"), "numba"),
    ("gptq-perchannel-numpy", dict(bits=4, group_size=-1, method="gptq", clip="mse"), "numpy"),
    ("ojbkq", dict(bits=3, group_size=16, method="ojbkq", n_samples=4, beam_width=4), "numba"),
    ("regcal-fixed", dict(bits=2, group_size=16, method="regcal", alpha=0.5), "numba"),
    ("regcal-closed-form", dict(bits=3, group_size=16, method="regcal", alpha="closed_form"), "numba"),
    ("rtn", dict(bits=4, group_size=16, method="rtn"), "numpy"),
]


@pytest.mark.slow
@pytest.mark.parametrize("label,spec_kw,backend", SPECS, ids=[s[0] for s in SPECS])
def test_row_split_equals_local(client, label, spec_kw, backend):
    W, H, D, bias = _layer()
    spec = QuantSpec(**spec_kw)
    local = quantize_weight(W, H, D, spec, backend=backend, rng=3, bias=bias)
    ex = LayerSolveExecutor(client, rows_per_task=16)
    fut = ex.submit(W, H, D, spec, backend=backend, rng=3, bias=bias, name=label)
    remote = fut.result(timeout=TIMEOUT)
    assert fut.done()
    _assert_same_layer(remote, local)
    closed_form = spec.method == "regcal" and spec.alpha == "closed_form"
    assert remote.stats["tasks"] == (1 if closed_form else 5)


@pytest.mark.slow
def test_generator_rng_is_advanced_like_the_local_call(client):
    W, H, D, _ = _layer(1, m=40)
    spec = QuantSpec(bits=3, group_size=16, method="ojbkq", n_samples=6)
    g_local, g_remote = np.random.default_rng(9), np.random.default_rng(9)
    ex = LayerSolveExecutor(client, rows_per_task=7)
    layers_local = [quantize_weight(W, H, D, spec, backend="numba", rng=g_local) for _ in range(2)]
    futs = [ex.submit(W, H, D, spec, backend="numba", rng=g_remote, name=f"l{i}") for i in range(2)]
    for f, ref in zip(futs, layers_local):  # two layers in flight at once, sharing H
        _assert_same_layer(f.result(timeout=TIMEOUT), ref)
    assert g_local.integers(1 << 40) == g_remote.integers(1 << 40)
    assert not np.array_equal(layers_local[0].codes, layers_local[1].codes)  # seeds matter


def test_row_blocks_and_options():
    assert row_blocks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ValueError, match="`rows_per_task`"):
        row_blocks(5, 0)
    with pytest.raises(ValueError, match="`rows_per_task`"):
        LayerSolveExecutor(object(), rows_per_task=0)


def test_cluster_gone_is_a_clear_error():
    cluster = distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                                       dashboard_address=None, host="127.0.0.1", protocol="tcp")
    client = distributed.Client(cluster, timeout=TIMEOUT)
    W, H, D, _ = _layer(2, m=20, n=16)
    spec = QuantSpec(bits=3, group_size=16, method="gptq")
    try:
        ex = LayerSolveExecutor(client, rows_per_task=10)
        assert ex.submit(W, H, None, spec, backend="numpy").result(timeout=TIMEOUT).shape == (20, 16)
        cluster.close(timeout=TIMEOUT)
        with pytest.raises(ClusterLostError, match="dask cluster"):
            ex.submit(W, H + 1.0, None, spec, backend="numpy").result(timeout=10)
    finally:
        client.close(timeout=TIMEOUT)
        cluster.close(timeout=TIMEOUT)

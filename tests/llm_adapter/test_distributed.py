"""Row-split layer solves on a 2-process LocalCluster == the local ``quantize_weight``, bit for bit;
``quantize_model(..., client=)`` and ``quantize --workers`` == the local runs; a lost cluster."""

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


# --------------------------------------------------------------------------- quantize_model / CLI
def _windows():
    import torch

    return torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))


def _assert_same_layers(remote, local):
    assert list(remote) == list(local)
    for name, q in local.items():
        a, b = remote[name].to_arrays(), q.to_arrays()
        assert a.keys() == b.keys(), name
        for key in b:
            assert a[key].dtype == b[key].dtype, (name, key)
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}.{key}")


def _model_specs():
    from llm_adapter.methods.glvq import GLVQSpec

    return [
        ("gptq", QuantSpec(bits=3, group_size=32, method="gptq"), "numba"),
        ("gptq-natural-numpy", QuantSpec(bits=4, group_size=32, method="gptq", ordering="natural"), "numpy"),
        ("ojbkq", QuantSpec(bits=3, group_size=32, method="ojbkq", n_samples=2, beam_width=2), "numba"),
        ("regcal-sample", QuantSpec(bits=3, method="regcal", alpha="sample"), "numba"),
        ("glvq", GLVQSpec(), "numba"),
        ("rtn-no-calibration", QuantSpec(bits=4, group_size=32, method="rtn"), "numpy"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(6), ids=[s[0] for s in _model_specs()])
def test_quantize_model_with_client_equals_local(client, index):
    """The driver's forward passes here, the solves on the 2-process cluster: the same
    layers as the local run (codes, scales, zeros, perm, generators: every stored array),
    and the same weights written back into the model (rtn: no forward pass, H = None)."""
    from llm_adapter.calibration import quantize_model
    from tests.llm_fixtures import tiny_llama

    _, spec, backend = _model_specs()[index]
    win = _windows()
    m_local, m_remote = tiny_llama(), tiny_llama()
    local = quantize_model(m_local, win, spec, progress=False, backend=backend, seed=3)
    remote = quantize_model(m_remote, win, spec, progress=False, backend=backend, seed=3, client=client)
    _assert_same_layers(remote, local)
    sd_local, sd_remote = m_local.state_dict(), m_remote.state_dict()
    for key, value in sd_local.items():
        assert bool((value == sd_remote[key]).all()), key


def test_client_and_solver_are_exclusive():
    from llm_adapter.calibration import InlineSolver, quantize_model
    from llm_adapter.errors import ParameterError
    from tests.llm_fixtures import tiny_llama

    with pytest.raises(ParameterError, match="`client`"):
        quantize_model(tiny_llama(), _windows(), QuantSpec(bits=4), progress=False, solver=InlineSolver(),
                       client=object())


@pytest.mark.slow
def test_cluster_lost_mid_run_keeps_finished_layers_and_resumes(tmp_path):
    """The cluster closes while the q/k/v stage is in flight: ClusterLostError names the
    layer being awaited, the checkpoint holds exactly the layers finished before, and a
    rerun without a cluster completes to the local run's result."""
    from llm_adapter.calibration import quantize_model
    from tests.llm_fixtures import tiny_llama

    spec = QuantSpec(bits=3, group_size=32, method="ojbkq", n_samples=2, beam_width=2)
    win = _windows()
    full = quantize_model(tiny_llama(), win, spec, progress=False, backend="numba", seed=3)

    cluster = distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                                       dashboard_address=None, host="127.0.0.1", protocol="tcp")
    lost_client = distributed.Client(cluster, timeout=TIMEOUT)
    seen = []

    def close_after_two(name, q):
        seen.append(name)
        if len(seen) == 2:  # q_proj, k_proj done; v_proj submitted with them, not yet fetched
            cluster.close(timeout=TIMEOUT)

    ckpt = tmp_path / "ckpt"
    try:
        with pytest.raises(ClusterLostError, match=r"layer 'model\.layers\.0\.self_attn\.v_proj'"):
            quantize_model(tiny_llama(), win, spec, progress=False, backend="numba", seed=3,
                           client=lost_client, checkpoint_dir=ckpt, callback=close_after_two)
    finally:
        lost_client.close(timeout=TIMEOUT)
        cluster.close(timeout=TIMEOUT)
    assert seen == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert sorted(p.stem for p in ckpt.glob("*.npz")) == sorted(seen)

    loaded = []
    resumed = quantize_model(tiny_llama(), win, spec, progress=False, backend="numba", seed=3,
                             checkpoint_dir=ckpt, callback=lambda name, q: loaded.append(name))
    _assert_same_layers(resumed, full)
    assert loaded == list(full)
    assert len(list(ckpt.glob("*.npz"))) == len(full)


@pytest.mark.slow
def test_cli_workers_equals_local_cli(tmp_path, capsys, tiny_dir, text_file):
    """``quantize --workers 2`` (a LocalCluster of 2 processes, closed at the end) saves
    the same tensors as the local run; a local rerun on its ``--checkpoint`` too."""
    from llm_adapter.formats import load_quantized
    from tests.llm_fixtures import run_cli

    common = ["quantize", "--model", tiny_dir, "--method", "ojbkq", "--bits", "3", "--group-size", "32",
              "--calib", text_file, "--calib-windows", "4", "--seqlen", "64", "--backend", "numba"]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "local")
    assert code == 0, err
    code, out, err = run_cli(capsys, *common, "--out", tmp_path / "dask", "--workers", "2",
                             "--checkpoint", tmp_path / "ckpt")
    assert code == 0, err
    assert "(2 workers)" in out
    local, _ = load_quantized(tmp_path / "local")
    remote, _ = load_quantized(tmp_path / "dask")
    _assert_same_layers(remote, local)
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "resumed", "--checkpoint", tmp_path / "ckpt")
    assert code == 0, err
    _assert_same_layers(load_quantized(tmp_path / "resumed")[0], local)


def test_cli_scheduler_and_workers_errors(tmp_path, capsys, tiny_dir, text_file, monkeypatch):
    from llm_adapter.cli import quantize
    from tests.llm_fixtures import run_cli

    code, _, err = run_cli(capsys, "quantize", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1",
                           "--out", tmp_path / "q")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run_cli(capsys, "quantize", "--workers", "0", "--out", tmp_path / "q")
    assert code == 2 and "--workers" in err
    monkeypatch.setattr(quantize, "_CONNECT_TIMEOUT", 2)
    code, _, err = run_cli(capsys, "quantize", "--model", tiny_dir, "--calib", text_file, "--calib-windows", "2",
                           "--seqlen", "32", "--scheduler", "tcp://127.0.0.1:1", "--out", tmp_path / "q")
    assert code == 2 and "--scheduler" in err and "cannot connect to tcp://127.0.0.1:1" in err
    assert not (tmp_path / "q").exists()


def test_cli_cluster_lost_exits_1_and_points_at_the_checkpoint(tmp_path, capsys, tiny_dir, text_file, monkeypatch):
    import contextlib

    import llm_adapter.calibration
    from llm_adapter.cli import quantize
    from tests.llm_fixtures import run_cli

    def lost(*args, **kwargs):
        assert kwargs["client"] == "a client"
        raise ClusterLostError("layer 'model.layers.0.mlp.up_proj': the dask cluster did not return its row blocks")

    monkeypatch.setattr(quantize, "_cluster", lambda args: contextlib.nullcontext("a client"))
    monkeypatch.setattr(llm_adapter.calibration, "quantize_model", lost)
    argv = ["quantize", "--model", tiny_dir, "--calib", text_file, "--calib-windows", "2", "--seqlen", "32",
            "--scheduler", "tcp://127.0.0.1:1", "--out", tmp_path / "q"]
    code, _, err = run_cli(capsys, *argv, "--checkpoint", tmp_path / "ckpt")
    assert code == 1
    assert "up_proj" in err and f"are in {tmp_path / 'ckpt'}: rerun with the same --checkpoint" in err
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "give --checkpoint DIR" in err
    assert not (tmp_path / "q").exists()


def test_cli_local_workers_get_the_mmap_threshold(monkeypatch):
    """``--workers`` processes start with glibc's ``MALLOC_MMAP_THRESHOLD_`` (the nanny's
    pre-spawn environment: glibc reads it once), unless the user set their own."""
    import os

    import dask

    from llm_adapter.cli import quantize

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    config = quantize._worker_malloc_config()
    assert config == {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": quantize.WORKER_MMAP_THRESHOLD}
    with dask.config.set(config):
        with distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=1, dashboard_address=None,
                                      host="127.0.0.1") as cluster, distributed.Client(cluster) as client:
            seen = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    assert list(seen.values()) == [str(quantize.WORKER_MMAP_THRESHOLD)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert quantize._worker_malloc_config() == {}

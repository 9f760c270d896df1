"""``quantize_model(..., device=..., backend="cupy")``: the whole device path with the GPU
solver backend.

* ``kernel``: under the CUDA simulator (``make gpu-sim``) the cupy backend runs its kernels
  on numpy arrays, so the device path runs with ``device="cpu"`` on a one-block tiny Llama
  (the simulator runs one Python thread per CUDA thread: few tokens, narrow layers) and
  is compared with the numpy backend on the same path (same statistics: codes equal up to
  summation-order ties) and with the host run (float64 statistics: ≥ 99.9 %).
* ``device``: on a CUDA device, ``device="cuda"`` (CuPy arrays through DLPack, statistics
  and solves on the device) against the CPU run, plus the peak device memory reported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_adapter import QuantSpec
from llm_adapter.calibration import quantize_model
from tests.llm_fixtures import BOS_ID, tiny_llama

from .conftest import SIMULATOR

SPECS = [QuantSpec(bits=4, group_size=16, method="gptq", block_size=8),
         QuantSpec(bits=3, group_size=16, method="ojbkq", n_samples=2, beam_width=2, block_size=8)]


def _model():
    return tiny_llama(layers=1, hidden=32, intermediate=48, heads=4, kv_heads=2)


def _windows(n=2, T=8):
    w = torch.randint(2, 258, (n, T), generator=torch.Generator().manual_seed(0))
    w[:, 0] = BOS_ID
    return w


def _agreement(a, b):
    assert list(a) == list(b)
    return float(np.mean(np.concatenate([(a[n].codes == b[n].codes).ravel() for n in a])))


@pytest.fixture
def small_launch():
    """Shrunk launch sizes, so the tiny layers cross CUDA-block and Babai-block edges."""
    from bils._cuda._common import LAUNCH

    saved = (LAUNCH.threads, LAUNCH.levels, LAUNCH.sub_levels, LAUNCH.kbest_levels)
    LAUNCH.threads, LAUNCH.levels, LAUNCH.sub_levels, LAUNCH.kbest_levels = 16, 8, 4, 4
    yield
    LAUNCH.threads, LAUNCH.levels, LAUNCH.sub_levels, LAUNCH.kbest_levels = saved


@pytest.mark.kernel
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the RNG's uint64 wrap-around
@pytest.mark.skipif(not SIMULATOR, reason="the simulator's version; a device runs test_cuda_device_path")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.method)
def test_simulated_gpu_backend_on_the_device_path(spec, small_launch):
    win = _windows()
    ref = quantize_model(_model(), win, spec, progress=False, backend="numpy", device="cpu", seed=2)
    gpu = quantize_model(_model(), win, spec, progress=False, backend="cupy", device="cpu", seed=2)
    assert {q.stats["backend"] for q in gpu.values()} == {"cupy"}
    assert _agreement(ref, gpu) >= 0.999
    for name in ref:
        np.testing.assert_allclose(gpu[name].stats["loss"], ref[name].stats["loss"], rtol=1e-6, err_msg=name)
    host = quantize_model(_model(), win, spec, progress=False, backend="numpy", seed=2)
    assert _agreement(host, gpu) >= 0.999


@pytest.mark.kernel
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.skipif(not SIMULATOR, reason="the stand-in CuPy runs its kernels in the simulator")
@pytest.mark.parametrize("spec", SPECS + [QuantSpec(bits=3, group_size=16, method="regcal", alpha="closed_form",
                                                    block_size=8)], ids=lambda s: s.method)
def test_device_branches_with_a_stand_in_cupy(spec, small_launch, monkeypatch):
    """The driver hands "device" arrays (a stand-in CuPy: numpy underneath) to the methods,
    so the device branches run: from_gram / joint_target on the device, the grid reduced on
    the device, the cupy backend resolved from the arrays. Same codes as the host arrays."""
    from llm_adapter.calibration import driver

    from .stand_in_cupy import install

    win = _windows()
    ref = quantize_model(_model(), win, spec, progress=False, backend="cupy", device="cpu", seed=2)
    cupy = install(monkeypatch)
    seen = []

    def device_array(t):
        a = cupy.asarray(t.detach().cpu().numpy())
        seen.append(type(a).__module__)
        return a

    monkeypatch.setattr(driver, "device_array", device_array)
    dev = quantize_model(_model(), win, spec, progress=False, backend="auto", device="cpu", seed=2)
    assert seen and set(seen) == {"cupy"}
    assert {q.stats["backend"] for q in dev.values()} == {"cupy"}
    for name in ref:
        q = dev[name]
        assert type(q.codes) is np.ndarray and type(q.scales) is np.ndarray and type(q.perm) is np.ndarray
        np.testing.assert_array_equal(q.codes, ref[name].codes, err_msg=name)
        np.testing.assert_array_equal(q.scales, ref[name].scales, err_msg=name)
        np.testing.assert_allclose(q.stats["loss"], ref[name].stats["loss"], rtol=1e-9, err_msg=name)


@pytest.mark.device
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.method)
def test_cuda_device_path(spec):
    import cupy  # noqa: F401  (the device path hands CuPy arrays to the solves)

    win = _windows(n=8, T=64)
    model = tiny_llama(layers=2)
    report = {}
    gpu = quantize_model(model, win, spec, progress=False, device="cuda", seed=2, report=report)
    assert {q.stats["backend"] for q in gpu.values()} == {"cupy"}
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model stayed home
    cpu = quantize_model(tiny_llama(layers=2), win, spec, progress=False, backend="numba", seed=2)
    assert _agreement(cpu, gpu) >= 0.999
    # reported, and small: a tiny block, its streams and solves (plus cuBLAS/cuSOLVER workspaces)
    assert 0 < report["peak_device_bytes"] < 512 * 2**20
    assert len(report["block_seconds"]) == 2

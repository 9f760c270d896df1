"""``quantize_model(..., device=...)``: block-by-block onloading, checked on the CPU.

The device path (streams on the device, one block there at a time, float32 statistics,
device arrays to the solves) runs here with ``device="cpu"``; the data-movement code is the
one a CUDA device runs. The CUDA solves themselves are checked under the simulator and on a
device in ``tests/gpu/test_device_quantize.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_adapter import QuantSpec
from llm_adapter.calibration import find_blocks, quantize_model
from llm_adapter.errors import ParameterError
from tests.llm_fixtures import BOS_ID, run_cli, tiny_llama

NUMPY = "numpy"


def _windows(n=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(2, 258, (n, T), generator=g)
    w[:, 0] = BOS_ID
    return w


def _agreement(a, b):
    assert list(a) == list(b)
    return float(np.mean(np.concatenate([(a[n].codes == b[n].codes).ravel() for n in a])))


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, group_size=32, method="gptq"),
    QuantSpec(bits=3, method="ojbkq", n_samples=2, beam_width=2),
    QuantSpec(bits=3, method="regcal", alpha="sample"),
])
def test_device_path_matches_the_host_path(spec):
    win = _windows()
    host_model, dev_model = tiny_llama(), tiny_llama()
    host = quantize_model(host_model, win, spec, progress=False, backend=NUMPY, batch_size=2, seed=1)
    report = {}
    dev = quantize_model(dev_model, win, spec, progress=False, backend=NUMPY, batch_size=2, seed=1,
                         device="cpu", report=report)
    # float32 sums instead of float64: codes agree up to the rounding of the statistics
    assert _agreement(host, dev) >= 0.999
    for name in host:
        np.testing.assert_allclose(dev[name].stats["loss"], host[name].stats["loss"], rtol=1e-3)
    assert report["device"] == "cpu" and len(report["block_seconds"]) == 2
    assert "peak_device_bytes" not in report  # CUDA only
    # the model was written in place, and stayed on its device
    for name, q in dev.items():
        w = dev_model.get_submodule(name).weight
        assert w.device.type == "cpu"
        assert torch.equal(w, torch.from_numpy(q.dequantize()))


class _Ledger:
    """Device accounting: every block's ``.to`` is wrapped; a move to `target` onloads the
    block (its parameter bytes count as on the device), a move anywhere else offloads it.
    A forward pre-hook on every block checks that the block running is on the device."""

    def __init__(self, blocks, target):
        self.target, self.on, self.peak, self.moves, self.bad_runs = target, {}, 0, [], []
        self.sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
        for i, block in enumerate(blocks):
            block.to = self._wrap(i, block, block.to)
            block.register_forward_pre_hook(lambda m, args, i=i: self._ran(i))

    def _wrap(self, i, block, to):
        def moved(*args, **kwargs):
            dev = torch.device(args[0]) if args else torch.device(kwargs["device"])
            out = to(*args, **kwargs)
            self.moves.append((i, str(dev)))
            if dev == self.target:
                self.on[i] = self.sizes[i]
            else:
                self.on.pop(i, None)
            self.peak = max(self.peak, sum(self.on.values()))
            assert len(self.on) <= 1, f"blocks {sorted(self.on)} on the device at once"
            return out
        return moved

    def _ran(self, i):
        if list(self.on) != [i]:
            self.bad_runs.append((i, sorted(self.on)))


def test_at_most_one_block_on_the_device_at_a_time():
    model = tiny_llama(layers=3)
    _, blocks = find_blocks(model)
    # an index makes the target compare unequal to the home device ("cpu"), so the ledger
    # can tell an onload from an offload; the tensors land on the CPU either way
    target = torch.device("cpu", 0)
    ledger = _Ledger(blocks, target)
    spec = QuantSpec(bits=3, method="ojbkq", n_samples=1, beam_width=1)
    quantize_model(model, _windows(), spec, progress=False, backend=NUMPY, batch_size=2, device=target)
    assert ledger.moves == [(0, "cpu:0"), (0, "cpu"), (1, "cpu:0"), (1, "cpu"), (2, "cpu:0"), (2, "cpu")]
    assert not ledger.bad_runs  # every block ran only while it was the one on the device
    assert ledger.peak == max(ledger.sizes) and not ledger.on

    # a failing turn still sends its block back
    def boom(name, q):
        raise RuntimeError("stop")

    ledger.moves.clear()
    with pytest.raises(RuntimeError, match="stop"):
        quantize_model(model, _windows(), QuantSpec(bits=3), progress=False, backend=NUMPY, device=target,
                       callback=boom)
    assert ledger.moves == [(0, "cpu:0"), (0, "cpu")] and not ledger.on


@pytest.mark.parametrize("device, match", [
    ("gpu", "`device` must be None, 'cpu', 'cuda', 'cuda:N'"),
    ("cuda:x", "`device` must be None"),
    (3, "`device` must be None"),
    (torch.device("meta"), "`device` must be None"),
])
def test_device_argument_is_validated(device, match):
    with pytest.raises(ParameterError, match=match) as err:
        quantize_model(tiny_llama(layers=1), _windows(), QuantSpec(), progress=False, device=device)
    assert err.value.param == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_device_without_cuda_is_a_clear_error(capsys, tiny_dir, text_file, tmp_path):
    with pytest.raises(ParameterError, match="torch sees no CUDA device"):
        quantize_model(tiny_llama(layers=1), _windows(), QuantSpec(), progress=False, device="cuda")
    code, _, err = run_cli(capsys, "quantize", "--model", tiny_dir, "--calib", text_file, "--device", "cuda",
                           "--out", tmp_path / "q")
    assert code == 2 and "--device" in err and "no CUDA device" in err


def test_cli_device_flag(capsys, tiny_dir, text_file, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "--device", "gpu0", "--out", tmp_path / "q")
    assert code == 2 and "--device" in err
    code, out, err = run_cli(capsys, "quantize", "--model", tiny_dir, "--calib", text_file, "--calib-windows", "2",
                             "--seqlen", "32", "--backend", NUMPY, "--device", "cpu", "--targets", "self_attn.*",
                             "--out", tmp_path / "q")
    assert code == 0, err
    assert "layers quantized" in out


def test_device_path_resumes_from_checkpoints(tmp_path):
    win = _windows()
    spec = QuantSpec(bits=3, group_size=32, method="gptq")
    full = quantize_model(tiny_llama(), win, spec, progress=False, backend=NUMPY, device="cpu")
    done = []

    def kill_after_4(name, q):
        done.append(name)
        if len(done) == 4:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_llama(), win, spec, progress=False, backend=NUMPY, device="cpu", checkpoint_dir=ckpt,
                       callback=kill_after_4)
    resumed = quantize_model(tiny_llama(), win, spec, progress=False, backend=NUMPY, device="cpu",
                             checkpoint_dir=ckpt)
    assert list(resumed) == list(full)
    for name in full:
        np.testing.assert_array_equal(resumed[name].codes, full[name].codes, err_msg=name)


@pytest.mark.parametrize("sym", [False, True])
def test_minmax_grid_from_group_extremes_is_the_same_grid(sym):
    # what compute_grid does with a device array: reduce each group to [min, max] there
    from llm_adapter.methods.uniform import _group_params

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 16))
    x[0, 0] = 0.0  # an all-zero group
    x[1, 1] = np.abs(x[1, 1])  # a group without negatives
    ext = np.stack([x.min(axis=-1), x.max(axis=-1)], axis=-1)
    for a, b in zip(_group_params(ext, 7, sym, "minmax"), _group_params(x, 7, sym, "minmax")):
        np.testing.assert_array_equal(a, b)


def test_float32_statistics_match_float64_and_reject_other_dtypes():
    from llm_adapter.calibration import LayerStatistics

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    xf = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    alphas = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    st64 = LayerStatistics(8, joint=True, alphas=alphas)
    st32 = LayerStatistics(8, joint=True, alphas=alphas, device="cpu", dtype=torch.float32)
    for i, (x, f) in enumerate(zip(xs, xf)):
        st64.add(x, f, seq=2 * i)
        st32.add(x, f, seq=2 * i)
    assert st32.H.dtype == torch.float32
    H32, D32 = st32.mean_tensors(30)
    assert H32.dtype == D32.dtype == torch.float64  # float64 for the factorisation
    H64, D64 = st64.mean(30)
    np.testing.assert_allclose(H32.numpy(), H64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D32.numpy(), D64, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`dtype` must be torch.float32 or torch.float64"):
        LayerStatistics(8, joint=False, dtype=torch.float16)

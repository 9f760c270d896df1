"""The single-pass calibration (issue #18) against the capture-pass path it replaces, and the
stage profile of a run.

The oracle is ``single_pass=False``: one capture pass per true-sequential group (stopped at
the group's input), then a pass through the quantized block. The single pass must give the
same codes bit for bit (the same operations, the sums in batch order) and the same weights,
on a dense model (Llama), one with Conv1D layers (GPT-2) and MoE models (Mixtral: fused
experts quantized per expert with routed-token statistics; Qwen2-MoE: a shared expert next
to the fused ones).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_adapter import QuantSpec
from llm_adapter.calibration import InlineSolver, quantize_model
from llm_adapter.calibration.profile import STAGES, StageProfile, format_profile
from tests.llm_adapter.test_architectures import tiny_model
from tests.llm_fixtures import BOS_ID, TINY_VOCAB

NUMPY = "numpy"


def _windows(n=6, T=16, seed=0):
    w = torch.randint(2, TINY_VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
    w[:, 0] = BOS_ID
    return w


def _run(family, spec, *, single_pass, batch_size=2, **kw):
    model = tiny_model(family)
    report = {}
    layers = quantize_model(model, _windows(), spec, backend=NUMPY, progress=False, seed=1, batch_size=batch_size,
                            single_pass=single_pass, report=report, **kw)
    return layers, model, report


def _assert_same(a, b):
    (la, ma, _), (lb, mb, _) = a, b
    assert list(la) == list(lb)
    for name in la:
        np.testing.assert_array_equal(la[name].codes, lb[name].codes, err_msg=name)
        np.testing.assert_array_equal(la[name].scales, lb[name].scales, err_msg=name)
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n


SPECS = {
    "gptq": QuantSpec(bits=3, group_size=16, method="gptq"),
    "ojbkq": QuantSpec(bits=3, group_size=16, method="ojbkq", n_samples=2, beam_width=2),
    "regcal-sample": QuantSpec(bits=3, method="regcal", alpha="sample"),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_single_pass_gives_the_codes_of_the_capture_passes(family, spec):
    if family != "llama" and spec == "regcal-sample":
        pytest.skip("one family is enough for the sampled α")
    _assert_same(_run(family, SPECS[spec], single_pass=True), _run(family, SPECS[spec], single_pass=False))


def test_single_pass_moe_with_a_shared_expert_and_uneven_batches():
    """Qwen2-MoE (a shared expert next to the fused experts), 6 windows in batches of 4 and 2."""
    spec = SPECS["gptq"]
    _assert_same(_run("qwen2_moe", spec, single_pass=True, batch_size=4),
                 _run("qwen2_moe", spec, single_pass=False, batch_size=4))


def test_single_pass_expert_fallback_statistics():
    """Experts routed fewer tokens than `min_expert_tokens` use the shared statistics in both paths."""
    spec = QuantSpec(bits=4, group_size=-1, method="gptq")
    a = _run("mixtral", spec, single_pass=True, min_expert_tokens=40)
    b = _run("mixtral", spec, single_pass=False, min_expert_tokens=40)
    assert any(q.stats.get("fallback") for q in a[0].values())
    _assert_same(a, b)


class _Boom(RuntimeError):
    pass


class _FailingSolver(InlineSolver):
    def __init__(self, after):
        self.after, self.n = after, 0

    def submit(self, name, *args, **kw):
        self.n += 1
        if self.n > self.after:
            raise _Boom(name)
        return super().submit(name, *args, **kw)


def test_single_pass_error_stops_the_batches_and_removes_the_hooks():
    import threading

    model = tiny_model("llama")
    before = threading.active_count()
    with pytest.raises(_Boom, match="o_proj"):
        quantize_model(model, _windows(), SPECS["gptq"], backend=NUMPY, progress=False, batch_size=2,
                       solver=_FailingSolver(3))
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert threading.active_count() == before


def test_single_pass_resume_is_bit_identical(tmp_path):
    spec = SPECS["ojbkq"]
    full, _, _ = _run("llama", spec, single_pass=True)
    done = []

    def kill_after_5(name, q):
        done.append(name)
        if len(done) == 5:
            raise _Boom(name)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Boom):
        _run("llama", spec, single_pass=True, checkpoint_dir=ckpt, callback=kill_after_5)
    resumed, _, report = _run("llama", spec, single_pass=True, checkpoint_dir=ckpt)
    assert list(resumed) == list(full)
    for name in full:
        np.testing.assert_array_equal(resumed[name].codes, full[name].codes, err_msg=name)
    assert report["profile"]["totals"]["checkpoint_io"] > 0


def test_not_true_sequential_ignores_single_pass():
    spec = SPECS["gptq"]
    _assert_same(_run("llama", spec, single_pass=True, true_sequential=False),
                 _run("llama", spec, single_pass=False, true_sequential=False))


def test_single_pass_must_be_a_bool():
    with pytest.raises(ValueError, match="`single_pass`"):
        quantize_model(tiny_model("llama"), _windows(), SPECS["gptq"], progress=False, single_pass="yes")


@pytest.mark.parametrize("single_pass", [True, False])
def test_profile_keys_in_the_report(single_pass):
    layers, _, report = _run("llama", SPECS["ojbkq"], single_pass=single_pass)
    prof = report["profile"]
    tot = prof["totals"]
    assert len(prof["blocks"]) == len(report["block_seconds"]) == 2
    for stage in ("capture_inputs", "forward_propagate", "forward_float", "statistics", "solve", "grid_search",
                  "write_back"):
        assert tot[stage] > 0, stage
    assert set(tot) <= set(STAGES) | {"blocks", "wall"}
    if not single_pass:
        assert tot["forward_capture"] > 0  # the capture passes
    for b, secs in zip(prof["blocks"], report["block_seconds"]):
        assert b["total"] == secs
        assert sum(v for k, v in b.items() if k != "total") == pytest.approx(secs, rel=1e-6, abs=1e-6)
    assert tot["blocks"] <= tot["wall"]
    assert all("time_grid" in q.stats for q in layers.values())
    text = format_profile(prof, per_block=True)
    assert "solve" in text and "total" in text


def test_profile_of_rtn_without_calibration():
    report = {}
    quantize_model(tiny_model("llama"), _windows(), QuantSpec(bits=4, method="rtn"), progress=False, report=report)
    tot = report["profile"]["totals"]
    assert tot["solve"] > 0 and "forward_propagate" not in tot and report["profile"]["blocks"] == []


def test_stage_profile_sums():
    p = StageProfile()
    p.add("model_load", 2.0)
    p.start_block()
    p.add("solve", 1.0)
    p.end_block(1.5)
    p.start_block()
    p.add("solve", 0.5)
    p.end_block(0.5)
    t = p.totals()
    assert t == {"model_load": 2.0, "solve": 1.5, "sync": 0.5, "blocks": 2.0}


def test_cli_quantize_verbose_prints_and_stores_the_profile(tmp_path, capsys, tiny_dir, text_file):
    from llm_adapter.formats import load_quantized
    from tests.llm_fixtures import run_cli

    code, out, err = run_cli(capsys, "quantize", "-vv", "--model", tiny_dir, "--method", "ojbkq", "--bits", "4",
                             "--group-size", "32", "--calib", text_file, "--calib-windows", "4", "--seqlen", "32",
                             "--batch-size", "2", "--backend", "numpy", "--out", tmp_path / "q")
    assert code == 0, err
    assert "stage profile (s)" in out and "forward_propagate" in out and "model_load" in out
    assert "block" in out[out.index("stage profile"):]  # -vv: one line per block
    _, meta = load_quantized(tmp_path / "q")
    prof = meta["model"]["report"]["profile"]
    assert prof["totals"]["model_load"] > 0 and len(prof["blocks"]) == 2


def test_single_pass_trims_the_heap_once_per_group_and_frees_the_float_inputs(monkeypatch):
    """The single pass gives the arenas' free pages back once per group solved (while every
    batch waits), and drops each float layer input of a joint method once it is in D."""
    from llm_adapter.calibration import driver
    from llm_adapter.calibration.memory import limit_arenas, trim

    assert isinstance(trim(), bool)
    with pytest.raises(ValueError, match="`n` must be a positive int"):
        limit_arenas(0)
    from llm_adapter.calibration.memory import fix_mmap_threshold

    for bad in (0, 4095, 32 * 2 ** 20 + 1, True, 4.0e6):
        with pytest.raises(ValueError, match=r"`nbytes` must be an int in \[4096, 33554432\]"):
            fix_mmap_threshold(bad)
    calls = []
    monkeypatch.setattr(driver, "trim_memory", lambda: calls.append(1) or True)
    kept = []
    real = driver._single_pass

    def spy(*a, **k):
        kept.append(a[6])  # finputs: {lead: [float input per batch]}
        return real(*a, **k)

    monkeypatch.setattr(driver, "_single_pass", spy)
    _run("llama", SPECS["ojbkq"], single_pass=True)
    assert len(calls) == 2 * 4  # 2 blocks x (q/k/v, o, gate/up, down)
    assert kept and all(x is None for finputs in kept for xs in finputs.values() for x in xs)


def test_fix_mmap_threshold_in_a_process_of_its_own():
    """glibc's ``mallopt`` takes the fixed threshold (process-wide, so in a child process)."""
    import subprocess
    import sys

    code = (
        "import ctypes, ctypes.util, sys\n"
        "from llm_adapter.calibration.memory import fix_mmap_threshold\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')\n"
        "if not hasattr(libc, 'mallopt'): print('skip'); sys.exit(0)\n"
        "print(fix_mmap_threshold(4 * 2**20))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2])).stdout.split()
    assert out[-1] in ("True", "skip")

"""``benchmarks/gpu_quantize.py --dry-run``: the script end to end on a tiny model on the CPU
(``device="cpu"``, the same onloading code), and its JSON has the fields ``make gpu-check``
reports. Runs in the ordinary test process (no kernels: skipped under the simulator, and on
a device, where ``make gpu-check`` runs the real benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import DEVICE, SIMULATOR

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(SIMULATOR or DEVICE, reason="a CPU check; make gpu-check runs the benchmark itself")
def test_gpu_quantize_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_quantize", ROOT / "benchmarks" / "gpu_quantize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "dry.json"
    rec = mod.main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dry_run"] and saved["device"] == rec["device"] == "cpu_dry_run"
    assert saved["errors"] == {} and "partial" not in saved
    for m in ("gptq", "ojbkq"):
        r = saved[m]
        assert r["layers"] == 14 and len(r["block_seconds"]) == 2
        assert r["s_per_block"] > 0 and r["solve_s_per_block"] > 0 and r["model_s_extrapolated"] > 0
        assert 0 < r["rel_loss_median"] < 0.05
    assert len(saved["torch_gptq_lean_s_per_layer"]) == 7
    # same H, same grid, float64 vs GPTQ's float32: the codes (nearly) agree
    assert saved["gptq_vs_torch_loop_code_agreement_q_proj"] >= 0.99
    assert set(saved["targets_met"]) == {"gptq_s_per_block", "ojbkq_over_gptq"}

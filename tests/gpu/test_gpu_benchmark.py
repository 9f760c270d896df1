"""``benchmarks/gpu_solvers.py --dry-run``: the benchmark's host side and every section it
times run end to end on a tiny layer (simulator or device), and its JSON has the fields
``make gpu-check`` reports (marker ``kernel``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel,
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_solvers_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_solvers", ROOT / "benchmarks" / "gpu_solvers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "dry.json"
    rec = mod.main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["n"] == rec["n"] == 24
    for key in ("babai_float64_s", "babai_float32_s", "klein8_s", "kbest8_3bit_s",
                "enum_1e5_n16_s", "kbest8_over_babai", "targets_met"):
        assert key in saved
    assert saved["babai_float64_code_match"] == 1.0
    assert saved["babai_float32_code_match"] >= 0.999
    assert saved["klein8_code_match_sub"] == 1.0 and saved["klein8_never_worse"]
    assert saved["kbest8_code_match_sub"] == 1.0
    assert saved["enum_code_match_sub"] == 1.0 and saved["enum_all_optimal"]

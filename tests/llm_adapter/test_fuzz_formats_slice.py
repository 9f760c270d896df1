"""A slice of ``benchmarks/fuzz_formats.py`` (byte flips in every stored format): every
tensor-data flip detected, no silent wrong result, no crash, no hang."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_formats", ROOT / "benchmarks" / "fuzz_formats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_formats_slice():
    mod = _fuzz_module()
    summary = mod.fuzz(200, seed=1, timeout=30.0)
    totals = summary["totals"]
    assert totals["silent_wrong"] == 0 and totals["crash"] == 0 and totals["hang"] == 0, summary["examples"]
    td = summary["tensor_data"]
    assert td["cases"] > 0 and td["detected"] == td["cases"]
    assert sum(totals.values()) == 200
    # every family and region was drawn
    assert all(sum(c.values()) > 0 for c in summary["by_target"].values())

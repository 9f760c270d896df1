"""benchmarks/gpu_kernels.py imports and its tiny mode runs every method in the simulator."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llm_adapter import kernels as K

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.kernel
def test_tiny_mode_matches_the_oracle(tmp_path, monkeypatch):
    from tests.gpu.conftest import SIMULATOR

    if not SIMULATOR:
        pytest.skip("the tiny mode is a simulator run")
    for nb in K.LAUNCH:
        monkeypatch.setitem(K.LAUNCH, nb, {"tx": 16, "ty": 2, "kv": 64})
    monkeypatch.setitem(K.TRANSFORM_THREADS, "threads", 32)
    res = _load().main(["--tiny", "--batches", "1", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_kernels_tiny_simulator.json").read_text())
    assert saved["mode"] == "tiny" and set(saved["batches"]) == {"1", "2"}
    for per_batch in res["batches"].values():
        assert len(per_batch) == 4
        assert all(r["max_rel_err"] < 2e-3 for r in per_batch.values())


def test_device_mode_has_the_issue_targets():
    mod = _load()
    assert mod.METHODS == ("fp16", "torch_int4", "W4 g128", "W3 g128", "W2 g128", "glvq d8 2b")
    assert sum(k * n for k, n in mod.LAYER_SHAPES) * mod.N_LAYERS == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert {(b, m, r) for b, m, r, _ in mod.TARGETS} >= {(1, "W4 g128", "fp16"), (1, "W4 g128", "torch_int4"),
                                                          (16, "W4 g128", "fp16")}

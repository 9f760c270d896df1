"""benchmarks/e2e_speed.py builds the same spec as benchmarks/llm_quality.py for every method it times;
benchmarks/e2e_floor.py counts a block's flops and the floor ratios (tiny test model)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.mark.parametrize("method", ["rtn", "gptq", "ojbkq", "regcal", "glvq"])
def test_spec_for_matches_llm_quality(method):
    from llm_adapter.methods.glvq import GLVQSpec

    e2e = _load("e2e_speed")
    lq = _load("llm_quality")
    spec = e2e.spec_for(method, "w3g128")
    assert spec == lq.make_spec("w3g128", method, {})
    assert (spec.bits, spec.group_size) == (3, 128)
    if method == "glvq":  # GLVQSpec takes no `method` field (the run that crashed before this test)
        assert isinstance(spec, GLVQSpec)
    else:
        assert spec.method == method


def test_floor_counts_and_ratios():
    from tests.llm_fixtures import tiny_llama

    floor = _load("e2e_floor")
    model = tiny_llama(hidden=64, heads=4, kv_heads=2, intermediate=128)
    data = floor.measure(model, batch_windows=2, seqlen=16, rounds=1, settle=0.0)
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in data["groups"]]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    T = 32
    f = data["flops_per_batch"]
    # q 64x64, k/v 32x64 (2 kv heads x 16), o 64x64, gate/up 128x64, down 64x128
    assert f["linear"] == 2 * T * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128)
    assert f["attention"] == 2 * 2 * 4 * 16 * (16 * 17 // 2) * 2
    assert f["group_widths"] == [64, 64, 64, 128]
    assert f["H"] == sum(T * w * (w + 1) for w in (64, 64, 64, 128))
    assert f["D"] == sum(2 * T * w * w for w in (64, 64, 64, 128))
    fl = data["floors"]
    for m, streams in (("gptq", 1), ("ojbkq", 2), ("regcal", 2), ("glvq", 1)):
        assert fl[m]["streams"] == streams
        assert fl[m]["floor_ratio"] == pytest.approx(streams + fl[m]["statistics_over_forward"])
        assert fl[m]["floor_ratio"] > streams
    # the joint methods pay for D on top of H
    assert fl["ojbkq"]["statistics_over_forward"] > fl["gptq"]["statistics_over_forward"]
    assert fl["ojbkq"]["flop_floor_ratio"] == pytest.approx(2 + (f["H"] + f["D"]) / f["forward"])

"""benchmarks/e2e_speed.py builds the same spec as benchmarks/llm_quality.py for every method it times."""

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

"""Kill-and-resume soak (issue 17), 3 points: SIGKILL a CLI quantization, resume, compare.

The full soak is ``python benchmarks/soak.py --points 20`` (``benchmarks/results/soak.json``).
"""

from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "benchmarks")


def test_soak_three_kill_points_resume_byte_identical(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import soak

    summary = soak.soak(points=3, seed=1, workdir=str(tmp_path), log=lambda *a: None)
    assert summary["points"] == 3, summary["records"]
    assert summary["identical"] == 3, summary["records"]
    assert summary["all_trials_identical"], summary["records"]

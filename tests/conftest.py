"""Shared pytest configuration: Hypothesis profiles and shared fixtures.

``tests`` is a package: helpers are imported as ``tests.oracles``, ``tests.llm_fixtures``...
(the layout mirrors the packages: ``tests/bils/``, ``tests/llm_adapter/``, ``tests/gpu/``).

Select a profile with ``pytest --hypothesis-profile=ci`` (used by ``make test``) or
``--hypothesis-profile=dev``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None)
# Plain ``pytest`` (no --hypothesis-profile) gets "dev": no deadline either, since numba's
# first call of a kernel loads it from the cache and takes far more than 200 ms. The
# plugin applies --hypothesis-profile after this, so "ci" still wins under ``make test``.
settings.load_profile("dev")

# The property tests call numba's parallel kernels thousands of times on tiny problems.
# With the OpenMP threading layer idle workers spin-wait between calls, which costs ~20x
# the kernel's own CPU time on the 2-core CI machine; let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --------------------------------------------------------------------------- CLI fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + byte tokenizer saved with ``save_pretrained`` (see tests.llm_fixtures)."""
    from tests.llm_fixtures import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A 4000-word text file of a 12-word vocabulary (calibration and evaluation text)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "doth", "speak", "and", "ere", "night", "falls", "we", "shall", "sleep"]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, 4000)) + "\n")
    return path

"""Shared pytest configuration: test helpers on ``sys.path`` and Hypothesis profiles.

Select a profile with ``pytest --hypothesis-profile=ci`` (used by ``make test``) or
``--hypothesis-profile=dev``.
"""

import os
import sys

from hypothesis import HealthCheck, settings

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

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

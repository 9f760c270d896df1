"""``rtn``: round to nearest on the static grid; needs no calibration statistics."""

from __future__ import annotations

import numpy as np

from ._shared import round_half_up
from .uniform import Solution, UniformProblem, register_uniform

__all__ = ["solve"]


def solve(prob: UniformProblem) -> Solution:
    """Codes ``clip(floor(W / S + Z + 1/2), 0, maxq)``; ``clipped_frac`` counts centres more
    than ½ outside the box."""
    c = prob.W / prob.S.T + prob.Z.T
    codes = np.clip(round_half_up(c), 0, prob.spec.maxq)
    clipped = float(np.mean((c < -0.5) | (c > prob.spec.maxq + 0.5)))
    return Solution(target=prob.W, codes=codes, stats={"clipped_frac": clipped})


METHOD = register_uniform("rtn", solve, needs_calibration=False, description="round to nearest",
                          device_arrays=True)

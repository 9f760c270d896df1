r"""``ojbkq``: joint target :math:`W_\mu` + Klein paths + K-best, the least-cost point per row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import bils
from bils import joint_target

from ._shared import namespace
from .uniform import Solution, UniformProblem, register_uniform

__all__ = ["solve"]


@dataclass
class _Picked:
    """Per-row minimum of two solver results (x, cost, backend)."""

    x: np.ndarray
    cost: np.ndarray
    backend: str


def solve(prob: UniformProblem) -> Solution:
    r"""Klein (``n_samples`` paths, temperature ``tau``) on :math:`W_\mu`, then K-best with
    ``spec.beam`` survivors when it exceeds 1; per row the lower cost wins. Without ``D``,
    :math:`\mu = 0`."""
    spec = prob.spec
    mu = spec.mu if prob.D is not None else 0.0
    target = joint_target(prob.W, prob.Hd, prob.D, mu) if mu else prob.W
    stats = {"alpha": mu}
    problem = prob.problem_for(target)
    res = prob.solve(bils.klein, problem, n_samples=spec.n_samples, tau=spec.tau, rng=prob.rng,
                     block_size=spec.block_size)
    if spec.beam > 1:
        kb = prob.solve(bils.kbest, problem, beam_width=spec.beam)
        better = kb.cost < res.cost
        xp = namespace(kb.x, res.x)  # CuPy on the device path
        x = xp.where(better[None, :], kb.x, res.x)
        stats["kbest_wins"] = float(xp.mean(better))
        res = _Picked(x, xp.where(better, kb.cost, res.cost), res.backend)
    return Solution(target=target, problem=problem, result=res, stats=stats)


METHOD = register_uniform("ojbkq", solve, description="joint target + Klein + K-best (OJBKQ)",
                          device_arrays=True)

"""``gptq``: box Babai (:func:`bils.babai`) on ``H`` — exactly GPTQ's loop."""

from __future__ import annotations

import bils

from .uniform import Solution, UniformProblem, register_uniform

__all__ = ["solve"]


def solve(prob: UniformProblem) -> Solution:
    """Nearest plane on the target ``W`` (lazy-batch blocks of ``spec.block_size``)."""
    problem = prob.problem_for(prob.W)
    res = prob.solve(bils.babai, problem, block_size=prob.spec.block_size)
    return Solution(target=prob.W, problem=problem, result=res)


METHOD = register_uniform("gptq", solve, description="box Babai on H (GPTQ)", device_arrays=True)

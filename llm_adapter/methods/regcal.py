r"""``regcal``: regularised target :math:`W_\alpha` + successive rounding (or a full-alphabet beam)."""

from __future__ import annotations

import bils
from bils import alpha_closed_form, joint_target

from ._shared import to_host
from .uniform import Solution, UniformProblem, register_uniform

__all__ = ["solve"]


def _round(prob: UniformProblem, alpha):
    target = joint_target(prob.W, prob.Hd, prob.D, alpha) if alpha else prob.W
    problem = prob.problem_for(target)
    spec = prob.spec
    if spec.beam > 1:
        res = prob.solve(bils.kbest, problem, beam_width=spec.beam, n_children=1 << spec.bits)
    else:
        res = prob.solve(bils.babai, problem, block_size=spec.block_size)
    return target, problem, res


def solve(prob: UniformProblem) -> Solution:
    r"""α fixed, sampled per sequence (already folded into ``D``: target :math:`W_1`), or
    closed form (quantize at ``alpha0``, :func:`bils.alpha_closed_form`, re-quantize).
    Without ``D``, α = 0."""
    spec = prob.spec
    use_d = prob.D is not None
    if not use_d:
        alpha = 0.0
    elif spec.alpha == "sample":
        alpha = 1.0  # α already folded into D per calibration sequence
    elif spec.alpha == "closed_form":
        alpha = spec.alpha0
    else:
        alpha = float(spec.alpha)
    target, problem, res = _round(prob, alpha)
    if use_d and spec.alpha == "closed_form":
        Q = prob.S.T * (res.x.T - prob.Z.T)
        alpha = alpha_closed_form(*(to_host(a) for a in (Q, prob.W, prob.Hd, prob.D)))  # a scalar, on the host
        target, problem, res = _round(prob, alpha)
    stats = {"alpha": alpha if spec.alpha != "sample" or not use_d else "sample"}
    return Solution(target=target, problem=problem, result=res, stats=stats)


METHOD = register_uniform("regcal", solve, description="regularised target + successive rounding (RegCal)",
                          device_arrays=True)

r"""``ojbkq``: joint target :math:`W_\mu` + Klein paths + K-best, the least-cost point per row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import bils
from bils import alpha_closed_form, joint_target

from ._shared import namespace, to_host
from .uniform import Solution, UniformProblem, register_uniform

__all__ = ["closed_form_mu", "solve"]


@dataclass
class _Picked:
    """Per-row minimum of two solver results (x, cost, backend)."""

    x: np.ndarray
    cost: np.ndarray
    backend: str


def solve(prob: UniformProblem) -> Solution:
    r"""Klein (``n_samples`` paths, temperature ``tau``) on :math:`W_\mu`, then K-best with
    ``spec.beam`` survivors when it exceeds 1; per row the lower cost wins. Without ``D``,
    :math:`\mu = 0`. With ``mu="closed_form"``, µ is RegCal's closed form of a Babai pass
    at ``alpha0`` (:func:`closed_form_mu`)."""
    spec = prob.spec
    if prob.D is None:
        mu = 0.0
    elif spec.mu == "closed_form":
        mu = closed_form_mu(prob)
    else:
        mu = spec.mu
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


def closed_form_mu(prob: UniformProblem) -> float:
    r"""Per-layer µ: quantize :math:`W_{\alpha_0}` with Babai, then
    :math:`\min(\alpha^*, \mu_{max})` with :math:`\alpha^*` = :func:`bils.alpha_closed_form`
    of that result (the α minimising :math:`\lVert (Q - W_\alpha)\tilde X\rVert^2`)."""
    spec = prob.spec
    a0 = spec.alpha0
    target = joint_target(prob.W, prob.Hd, prob.D, a0) if a0 else prob.W
    res = prob.solve(bils.babai, prob.problem_for(target), block_size=spec.block_size)
    Q = prob.S.T * (res.x.T - prob.Z.T)
    alpha = alpha_closed_form(*(to_host(a) for a in (Q, prob.W, prob.Hd, prob.D)))
    return float(min(alpha, spec.mu_max))


METHOD = register_uniform("ojbkq", solve, description="joint target + Klein + K-best (OJBKQ)",
                          device_arrays=True)

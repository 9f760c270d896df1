r"""Property-based verification of BILS solvers — yours or ours.

Like :mod:`numpy.testing` for arrays and :mod:`hypothesis.extra.numpy` for array code,
this package checks box-constrained integer least-squares (BILS / CVP / quantization
rounding) code against ground truth:

* **strategies** (:mod:`bils.testing.strategies`, needs Hypothesis): well-posed problems by
  construction — sizes, boxes, per-coordinate / per-RHS grids, well- and ill-conditioned
  ``R``, noiseless, noisy and tie-heavy targets, layer-shaped problems from a Gram matrix;
* **oracles** (:mod:`bils.testing.oracles`): brute force over the box, the exact solver
  with a certificate, the textbook Babai loop;
* **assertions** (:mod:`bils.testing.assertions`): :func:`assert_feasible`,
  :func:`assert_cost_consistent`, :func:`assert_optimal`, :func:`assert_never_worse_than`,
  :func:`assert_multi_rhs_consistent`, :func:`assert_translation_equivariant`, ... — each
  failure shows the smallest failing RHS as a self-contained problem, its cost and the
  optimum;
* :func:`check_solver` (needs Hypothesis): the whole contract against any callable with
  the library's signature, returning a :class:`CheckReport`.

Importing :mod:`bils.testing` does not import Hypothesis; :mod:`bils.testing.strategies`
and :func:`check_solver` do, and raise an ``ImportError`` naming the ``test`` extra
(``pip install 'bils[test]'``) when it is missing.
"""

from __future__ import annotations

import importlib

from ._case import ProblemCase, as_case
from .assertions import (
    assert_cost_consistent,
    assert_feasible,
    assert_multi_rhs_consistent,
    assert_never_worse_than,
    assert_optimal,
    assert_recovers,
    assert_same_solution,
    assert_translation_equivariant,
)
from .contract import DEFAULT_PROPERTIES, PROPERTIES, Property, threaded_rng
from .oracles import babai_textbook, brute_force, exact_solve

__all__ = [
    "ProblemCase",
    "as_case",
    "brute_force",
    "babai_textbook",
    "exact_solve",
    "assert_feasible",
    "assert_cost_consistent",
    "assert_optimal",
    "assert_never_worse_than",
    "assert_multi_rhs_consistent",
    "assert_translation_equivariant",
    "assert_recovers",
    "assert_same_solution",
    "PROPERTIES",
    "DEFAULT_PROPERTIES",
    "Property",
    "threaded_rng",
    "check_solver",
    "CheckReport",
    "PropertyOutcome",
    "strategies",
]

_NEEDS_HYPOTHESIS = {"check_solver": "._check", "CheckReport": "._check",
                     "PropertyOutcome": "._check", "strategies": ".strategies"}

_MISSING = ("bils.testing.{name} needs Hypothesis, which is not installed: "
            "pip install 'bils[test]'")


def __getattr__(name):
    mod = _NEEDS_HYPOTHESIS.get(name)
    if mod is None:
        raise AttributeError(f"module 'bils.testing' has no attribute {name!r}")
    try:
        module = importlib.import_module(mod, __name__)
    except ImportError as exc:
        if "hypothesis" in str(exc).lower():
            raise ImportError(_MISSING.format(name=name)) from exc
        raise
    value = module if name == "strategies" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

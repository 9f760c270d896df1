r"""The BILS solver contract as named properties.

Each property is a function ``check(solver, example, *, rtol)`` that calls ``solver`` on
one drawn example (a :class:`~bils.testing.ProblemCase`, or ``(case, shift)`` for
translation) and raises ``AssertionError`` (from :mod:`bils.testing.assertions`) when the
property fails. :func:`bils.testing.check_solver` runs them under Hypothesis; the
project's own test-suite calls the same functions for every solver and backend.

=========================== ========================================================= =======
property                    what must hold                                            default
=========================== ========================================================= =======
``feasible``                integer ``x`` of the right shape inside the box           yes
``cost_consistent``         reported cost = ``||y - R(s∘x + o)||²`` recomputed          yes
``multi_rhs``               all RHS at once = a loop over the columns                 yes
``translation_equivariant`` moving ``y`` and the box by ``R(s∘t)``, ``t`` moves ``x``     yes
``noiseless_recovery``      ``y = R(s∘x* + o)`` with ``x*`` in the box gives ``x*``      yes
``never_worse_than_babai``  cost <= the textbook Babai point's cost                   no
``matches_babai``           ``x`` = the textbook Babai point (Babai-equivalent solvers) no
``optimal``                 cost = brute-force optimum (exact solvers)                no
=========================== ========================================================= =======
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .assertions import (
    RTOL,
    assert_cost_consistent,
    assert_feasible,
    assert_multi_rhs_consistent,
    assert_never_worse_than,
    assert_optimal,
    assert_recovers,
    assert_same_solution,
    assert_translation_equivariant,
)
from .oracles import babai_textbook

__all__ = ["Property", "PROPERTIES", "DEFAULT_PROPERTIES", "threaded_rng"]


class threaded_rng:  # noqa: N801 - used like a function: threaded_rng(bils.klein, 0)
    """A randomised solver with one ``numpy.random.Generator`` threaded through its calls.

    ``threaded_rng(bils.klein, seed, n_samples=8)(R, Y, lo, hi, ...)`` calls
    ``bils.klein(R, Y, lo, hi, ..., rng=gen, n_samples=8)`` with the same generator
    every time until :meth:`reset` (which the contract calls before each independent
    solve) starts it again from ``seed``. A solver that draws one seed per RHS in
    column order then satisfies ``multi_rhs``: the batch and the column-by-column loop
    see the same seeds.

    Parameters
    ----------
    solver : callable
        A randomised solver taking a ``rng`` keyword (e.g. :func:`bils.klein`).
    seed : int or None, default 0
        Seed of the threaded :class:`numpy.random.Generator`.
    **options
        Further keyword arguments passed to every call of `solver`.

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import threaded_rng
    >>> klein = threaded_rng(bils.klein, 0, n_samples=4, backend="numpy")
    >>> klein
    threaded_rng(klein[rng=0])
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> Y = np.array([[3.125, 0.25], [0.875, -1.375]])
    >>> first = klein(R, Y, -2, 2)  # rng=<the generator>, n_samples=4, backend="numpy"
    >>> klein.reset()  # start the generator again from the seed
    >>> bool(np.array_equal(klein(R, Y, -2, 2).x, first.x))
    True
    """

    def __init__(self, solver, seed=0, **options):
        self.solver = solver
        self.seed = seed
        self.options = options
        self.__name__ = f"{getattr(solver, '__name__', 'solver')}[rng={seed}]"
        self.reset()

    def reset(self):
        self._gen = np.random.default_rng(self.seed)

    def __call__(self, *args, **kwargs):
        return self.solver(*args, rng=self._gen, **self.options, **kwargs)

    def __repr__(self):
        return f"threaded_rng({self.__name__})"


def feasible(solver, case, *, rtol=RTOL):
    assert_feasible(case.solve(solver), case)


def cost_consistent(solver, case, *, rtol=RTOL):
    assert_cost_consistent(case.solve(solver), case, rtol=rtol)


def multi_rhs(solver, case, *, rtol=RTOL):
    assert_multi_rhs_consistent(solver, case, rtol=rtol)


def translation_equivariant(solver, example, *, rtol=RTOL):
    case, shift = example
    assert_translation_equivariant(solver, case, shift, rtol=rtol)


def noiseless_recovery(solver, case, *, rtol=RTOL):
    assert_recovers(case.solve(solver), case)


def never_worse_than_babai(solver, case, *, rtol=RTOL):
    assert_never_worse_than(case.solve(solver), babai_textbook, case, rtol=rtol)


def matches_babai(solver, case, *, rtol=RTOL):
    assert_same_solution(case.solve(solver), case.solve(babai_textbook), case, rtol=rtol,
                         names=("solver", "textbook Babai"))


def optimal(solver, case, *, rtol=RTOL):
    assert_optimal(case.solve(solver), case, rtol=rtol)


@dataclass(frozen=True)
class Property:
    """One named property of the contract.

    ``example`` says what :func:`check` expects: ``"case"`` (a ProblemCase), ``"multi"``
    (a case with k >= 2), ``"shifted"`` (``(case, shift)``), ``"noiseless"`` (a case with
    ``x_true``) or ``"small"`` (a case whose box is small enough for brute force).

    Parameters
    ----------
    name : str
        The key in :data:`PROPERTIES` (``"feasible"``, ``"optimal"``, ...).
    check : callable
        ``check(solver, example, *, rtol)``: returns ``None`` when the property holds
        and raises ``AssertionError`` (from :mod:`bils.testing.assertions`) otherwise.
    example : {"case", "multi", "shifted", "noiseless", "small"}
        The kind of example ``check`` takes (see above).
    default : bool
        Whether it is in :data:`DEFAULT_PROPERTIES`, checked by
        :func:`~bils.testing.check_solver` unless other properties are named.
    description : str
        One line on what must hold (shown in :class:`~bils.testing.CheckReport`).

    Examples
    --------
    >>> import functools
    >>> import numpy as np, bils
    >>> from bils.testing import PROPERTIES, as_case
    >>> prop = PROPERTIES["optimal"]
    >>> prop.example, prop.default, prop.description
    ('small', False, 'cost equals the brute-force optimum')
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> case = as_case((R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2))
    >>> prop.check(functools.partial(bils.enumerate, backend="numpy"), case, rtol=1e-9)
    >>> prop.check(functools.partial(bils.babai, backend="numpy"), case, rtol=1e-9)
    Traceback (most recent call last):
        ...
    AssertionError: assert_optimal: 1 of 2 right-hand side(s) fail; smallest counterexample is RHS 1
    ...
    """

    name: str
    check: Callable
    example: str
    default: bool
    description: str


PROPERTIES = {p.name: p for p in (
    Property("feasible", feasible, "case", True,
             "integer x of the right shape inside [lo, hi]"),
    Property("cost_consistent", cost_consistent, "case", True,
             "reported cost equals ||y - R(s*x + o)||^2 recomputed from x"),
    Property("multi_rhs", multi_rhs, "multi", True,
             "solving all RHS at once equals a loop over the columns"),
    Property("translation_equivariant", translation_equivariant, "shifted", True,
             "moving y by R(s*t) and the box by t moves x by t"),
    Property("noiseless_recovery", noiseless_recovery, "noiseless", True,
             "y = R(s*x_true + o) with x_true in the box returns x_true"),
    Property("never_worse_than_babai", never_worse_than_babai, "case", False,
             "cost <= the textbook Babai point's cost"),
    Property("matches_babai", matches_babai, "case", False,
             "x equals the textbook Babai point"),
    Property("optimal", optimal, "small", False,
             "cost equals the brute-force optimum"),
)}

DEFAULT_PROPERTIES = tuple(name for name, p in PROPERTIES.items() if p.default)

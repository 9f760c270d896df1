"""check_solver: run the whole BILS contract against a user's solver under Hypothesis."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import strategies as st

from . import strategies as bst
from .assertions import RTOL
from .contract import DEFAULT_PROPERTIES, PROPERTIES

__all__ = ["check_solver", "CheckReport", "PropertyOutcome", "example_strategy"]


@dataclass(frozen=True)
class PropertyOutcome:
    """What happened to one property.

    ``held`` is True when no counterexample was found in ``examples`` examples; else
    ``counterexample`` is the failure message for the shrunk (smallest) example found
    and ``example`` that example itself.

    Parameters
    ----------
    name : str
        The property's name (a key of :data:`bils.testing.PROPERTIES`).
    held : bool
        No counterexample was found.
    examples : int
        Number of examples Hypothesis ran (shrinking steps included).
    counterexample : str or None, default None
        The failure message of the shrunk example, ``None`` when the property held.
    description : str, default ""
        What the property requires (:attr:`bils.testing.Property.description`).
    example : object, default None
        The shrunk failing example (a ProblemCase, or ``(case, shift)``), else ``None``.

    Examples
    --------
    >>> import functools, bils
    >>> from bils.testing import check_solver
    >>> report = check_solver(functools.partial(bils.babai, backend="numpy"),
    ...                       properties=["feasible"], max_examples=5)
    >>> outcome = report["feasible"]
    >>> outcome.name, outcome.held, outcome.examples, outcome.counterexample
    ('feasible', True, 5, None)
    """

    name: str
    held: bool
    examples: int
    counterexample: str | None = None
    description: str = ""
    example: object = None  # the shrunk failing example (a ProblemCase, or (case, shift))


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check_solver`: one :class:`PropertyOutcome` per property.

    Parameters
    ----------
    solver : str
        Name of the checked solver (shown in the report).
    outcomes : tuple of PropertyOutcome
        One per checked property, in the order they were run.

    Examples
    --------
    >>> from bils.testing import CheckReport, PropertyOutcome
    >>> report = CheckReport("my_solver", (
    ...     PropertyOutcome("feasible", True, 50, description="x inside [lo, hi]"),
    ...     PropertyOutcome("optimal", False, 7, "assert_optimal: ...", "cost is optimal")))
    >>> report.passed, report.held, report.failed, bool(report)
    (False, ['feasible'], ['optimal'], False)
    >>> print(report.summary())
    check_solver(my_solver): 1 failed
      feasible  held    (50 examples)  x inside [lo, hi]
      optimal   FAILED  (7 examples)  cost is optimal
    >>> report.counterexamples
    {'optimal': 'assert_optimal: ...'}
    >>> report.raise_if_failed()
    Traceback (most recent call last):
        ...
    AssertionError: check_solver(my_solver): 1 failed
    ...
    """

    solver: str
    outcomes: tuple = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """True when every property held."""
        return all(o.held for o in self.outcomes)

    @property
    def held(self) -> list:
        return [o.name for o in self.outcomes if o.held]

    @property
    def failed(self) -> list:
        return [o.name for o in self.outcomes if not o.held]

    @property
    def counterexamples(self) -> dict:
        """``{property: failure message}`` for the properties that failed."""
        return {o.name: o.counterexample for o in self.outcomes if not o.held}

    def __getitem__(self, name) -> PropertyOutcome:
        for o in self.outcomes:
            if o.name == name:
                return o
        raise KeyError(name)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        """One line per property."""
        w = max([len(o.name) for o in self.outcomes] + [8])
        lines = [f"check_solver({self.solver}): "
                 f"{'all properties held' if self.passed else f'{len(self.failed)} failed'}"]
        for o in self.outcomes:
            mark = "held  " if o.held else "FAILED"
            lines.append(f"  {o.name:<{w}}  {mark}  ({o.examples} examples)  {o.description}")
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.summary()]
        for name, text in self.counterexamples.items():
            parts.append(f"\n--- {name} ---\n{text}")
        return "\n".join(parts)

    def raise_if_failed(self):
        """Raise ``AssertionError`` with the full report when a property failed."""
        if not self.passed:
            raise AssertionError(str(self))


def example_strategy(kind, *, max_n=6, max_k=3, max_box_points=None):
    """The Hypothesis strategy :func:`check_solver` uses for a property's ``example`` kind.

    General examples mix random triangular problems (all target kinds, grids, boxes,
    conditioning) with layer-shaped problems from a Gram matrix.
    """
    kw = dict(max_n=max_n, max_k=max_k, max_box_points=max_box_points)
    general = bst.bils_problems(**kw)
    bits, layer_n = (2, 3), max(2, max_n)
    if max_box_points is not None:  # layer boxes hold 2**(bits * n) points
        bits, layer_n = (2,), max(2, min(max_n, int(np.log2(max(max_box_points, 4)) // 2)))
    layers = bst.layer_problems(min_n=2, max_n=layer_n, max_m=max_k, bits=bits).map(
        lambda lay: lay.case())
    if kind == "case":
        return st.one_of(general, layers)
    if kind == "multi":
        return bst.bils_problems(**dict(kw, min_k=2, max_k=max(2, max_k)))
    if kind == "shifted":
        return bst.shifted_problems(general)
    if kind == "noiseless":
        return bst.bils_problems(**kw, targets=("noiseless",))
    if kind == "small":
        small = 4096 if max_box_points is None else min(max_box_points, 4096)
        return bst.bils_problems(**dict(kw, max_n=min(max_n, 5), max_box_points=small))
    raise ValueError(f"unknown example kind {kind!r}")


def _describe_failure(exc, example) -> str:
    if isinstance(exc, AssertionError) and "counterexample" in str(exc):
        return str(exc)
    # the solver raised (or failed an assertion of its own): the error and the shrunk example
    tb = "".join(traceback.format_exception_only(type(exc), exc)).strip().split("\n")[0]
    return f"{tb}\nfailing example (shrunk):\n{example!r}"


def check_solver(solver, *, properties=None, max_examples=50, max_n=6, max_k=3,
                 max_box_points=None, derandomize=True, rtol=RTOL, name=None) -> CheckReport:
    """Check a BILS solver against the library's contract with property-based tests.

    Parameters
    ----------
    solver : callable
        ``solver(R, Y, lo, hi, /, *, scale=None, offset=None)`` returning a
        :class:`bils.BILSResult` (anything with ``.x`` (n, k) and ``.cost`` (k,)) — the
        signature of every ``bils`` solver; bind options with :func:`functools.partial`.
        A randomised solver must be deterministic given its inputs: wrap it with
        :class:`~bils.testing.threaded_rng`.
    properties : sequence of str, optional
        Names from :data:`bils.testing.PROPERTIES`; default
        :data:`~bils.testing.DEFAULT_PROPERTIES` (feasible, cost_consistent, multi_rhs,
        translation_equivariant, noiseless_recovery). Add ``"never_worse_than_babai"``
        for improvers of Babai, ``"matches_babai"`` for Babai itself, ``"optimal"`` for
        exact solvers.
    max_examples : int
        Hypothesis examples per property.
    max_n, max_k : int
        Largest problems drawn (coordinates, right-hand sides).
    max_box_points : int, optional
        Largest box (points per RHS) drawn, e.g. to keep an exhaustive search quick.
    derandomize : bool
        Reproducible examples (the default, as in CI).
    rtol : float
        Relative tolerance on costs.
    name : str, optional
        Name used in the report (default: the callable's ``__name__``).

    Returns
    -------
    CheckReport
        ``report.passed``, ``report.failed``, ``report.counterexamples``; ``str(report)``
        prints a table and each shrunk counterexample with its cost and the optimum;
        ``report.raise_if_failed()`` turns it into a test failure.

    Examples
    --------
    >>> import functools, bils
    >>> from bils.testing import check_solver
    >>> report = check_solver(functools.partial(bils.babai, backend="numpy"),
    ...                       max_examples=10)
    >>> report.passed
    True
    """
    names = list(DEFAULT_PROPERTIES if properties is None else properties)
    unknown = [p for p in names if p not in PROPERTIES]
    if unknown:
        raise ValueError(f"`properties` has unknown names {unknown}; "
                         f"choose from {tuple(PROPERTIES)}")
    if not callable(solver):
        raise TypeError("`solver` must be callable")
    label = name or getattr(solver, "__name__", None) or repr(solver)
    outcomes = []
    for pname in names:
        prop = PROPERTIES[pname]
        strategy = example_strategy(prop.example, max_n=max_n, max_k=max_k,
                                    max_box_points=max_box_points)
        outcomes.append(_run_property(prop, solver, strategy, max_examples=max_examples,
                                      derandomize=derandomize, rtol=rtol))
    return CheckReport(str(label), tuple(outcomes))


def _run_property(prop, solver, strategy, *, max_examples, derandomize, rtol):
    count = [0]
    last = [None]

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize,
              database=None, report_multiple_bugs=False, verbosity=Verbosity.quiet,
              print_blob=False, suppress_health_check=list(HealthCheck))
    @given(example=strategy)
    def run(example):
        count[0] += 1
        last[0] = example  # Hypothesis replays the shrunk example last
        prop.check(solver, example, rtol=rtol)

    try:
        run()
    except Exception as exc:  # noqa: BLE001 - any failure of the solver is a finding
        return PropertyOutcome(prop.name, False, count[0], _describe_failure(exc, last[0]),
                               prop.description, last[0])
    return PropertyOutcome(prop.name, True, count[0], None, prop.description)

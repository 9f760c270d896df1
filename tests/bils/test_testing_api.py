"""bils.testing as a public API: check_solver passes every bils solver and backend, and
catches planted bugs with shrunk counterexamples; oracles and assertions behave; importing
bils (or bils.testing) never imports Hypothesis."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

import bils
from bils.testing import (
    DEFAULT_PROPERTIES,
    PROPERTIES,
    ProblemCase,
    assert_cost_consistent,
    assert_feasible,
    assert_multi_rhs_consistent,
    assert_never_worse_than,
    assert_optimal,
    assert_recovers,
    assert_same_solution,
    assert_translation_equivariant,
    babai_textbook,
    brute_force,
    check_solver,
    exact_solve,
    threaded_rng,
)

EXAMPLES = 40


def _available(solver, backend):
    try:
        solver(np.eye(1), np.zeros(1), 0, 1, backend=backend)
    except (NotImplementedError, ImportError) as exc:
        pytest.skip(f"{solver.__name__} backend {backend!r} not available: {exc}")


# --------------------------------------------------------------------------- a toy solver
def toy_babai(R, Y, lo, hi, *, scale=None, offset=None, rounding="half_up", clip=True,
              hi_shift=0, grid_of_first_rhs=False):
    """A small vectorised box Babai with switches that plant classic bugs."""
    R = np.asarray(R, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n, k = Y.shape
    S = np.broadcast_to(1.0 if scale is None else scale, (n, k))
    O = np.broadcast_to(0.0 if offset is None else offset, (n, k))
    if grid_of_first_rhs:  # bug: the grid of RHS 0 used for every RHS
        S, O = np.broadcast_to(S[:, :1], (n, k)), np.broadcast_to(O[:, :1], (n, k))
    LO, HI = np.broadcast_to(lo, (n, k)), np.broadcast_to(hi, (n, k)) + hi_shift
    rnd = {"half_up": lambda c: np.floor(c + 0.5), "half_even": np.round}[rounding]
    Yr = Y - R @ O
    Z = np.zeros((n, k))
    x = np.zeros((n, k), dtype=np.int64)
    cost = np.zeros(k)
    for i in range(n - 1, -1, -1):
        t = Yr[i] - R[i, i + 1:] @ Z[i + 1:]
        d = R[i, i] * S[i]
        xi = rnd(t / d)
        if clip:
            xi = np.clip(xi, LO[i], HI[i])
        x[i], Z[i] = xi, S[i] * xi
        cost += (t - d * xi) ** 2
    return SimpleNamespace(x=x, cost=cost)


PLANTED = {
    # name: (toy options, properties that must catch it)
    "off_by_one_box": ({"hi_shift": 1}, {"feasible"}),
    "wrong_tie_rule": ({"rounding": "half_even"}, {"translation_equivariant"}),
    "column_mixup_across_rhs": ({"grid_of_first_rhs": True}, {"multi_rhs", "cost_consistent"}),
    "ignores_the_box": ({"clip": False}, {"feasible"}),
}


def test_correct_toy_passes():
    report = check_solver(toy_babai, max_examples=EXAMPLES,
                          properties=DEFAULT_PROPERTIES + ("matches_babai",))
    assert report.passed, str(report)


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_caught_with_a_shrunk_counterexample(bug):
    options, catchers = PLANTED[bug]
    solver = functools.partial(toy_babai, **options)
    report = check_solver(solver, max_examples=EXAMPLES, name=bug)
    assert not report.passed
    caught = set(report.failed) & catchers
    assert caught, f"{bug} not caught by {catchers}:\n{report}"
    for name in caught:
        out = report[name]
        text = out.counterexample
        # the message shows the smallest failing RHS as code, its cost and the optimum
        assert "counterexample (RHS" in text and "R = np.array(" in text, text
        assert "returned x =" in text and "optimum  x =" in text, text
        case = out.example[0] if isinstance(out.example, tuple) else out.example
        assert isinstance(case, ProblemCase)
        # shrunk: one coordinate, and one RHS unless the bug needs two
        assert case.n == 1, f"not shrunk to n=1:\n{text}"
        assert case.k <= (2 if name == "multi_rhs" else 1) or name == "cost_consistent", text
    assert bug in str(report) and "FAILED" in str(report)


def test_report_api():
    report = check_solver(functools.partial(toy_babai, clip=False), max_examples=10,
                          properties=["feasible", "cost_consistent"], name="noclip")
    assert report.failed == ["feasible"] and report.held == ["cost_consistent"]
    assert not report and report["feasible"].examples >= 1
    assert set(report.counterexamples) == {"feasible"}
    assert "noclip" in report.summary()
    with pytest.raises(AssertionError, match="feasible"):
        report.raise_if_failed()
    with pytest.raises(KeyError):
        report["optimal"]


def test_check_solver_rejects_unknown_properties():
    with pytest.raises(ValueError, match="`properties` has unknown names"):
        check_solver(toy_babai, properties=["feasible", "fast"])
    with pytest.raises(TypeError, match="`solver` must be callable"):
        check_solver(42)


def test_solver_that_raises_is_a_failure():
    def broken(R, Y, lo, hi, *, scale=None, offset=None):
        if Y.shape[1] > 1:
            raise RuntimeError("multi-RHS not supported")
        return toy_babai(R, Y, lo, hi, scale=scale, offset=offset)

    report = check_solver(broken, max_examples=10, properties=["multi_rhs"])
    assert report.failed == ["multi_rhs"]
    assert "RuntimeError: multi-RHS not supported" in report["multi_rhs"].counterexample


# --------------------------------------------------------------------------- every bils solver
BACKENDS = ("numpy", "numba")

SOLVERS = {
    "babai": (bils.babai, {}, ("matches_babai", "never_worse_than_babai"), None),
    "klein": (bils.klein, {"n_samples": 6}, ("never_worse_than_babai",), None),
    "kbest": (bils.kbest, {"beam_width": 4}, ("never_worse_than_babai",), None),
    "enumerate": (bils.enumerate, {}, ("never_worse_than_babai", "optimal"), 4096),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_check_solver_passes_every_bils_solver(name, backend):
    solver, options, extra, max_points = SOLVERS[name]
    _available(solver, backend)
    if name == "klein":
        fn = threaded_rng(solver, 2024, backend=backend, **options)
    else:
        fn = functools.partial(solver, backend=backend, **options)
    report = check_solver(fn, properties=DEFAULT_PROPERTIES + extra, max_examples=EXAMPLES,
                          max_box_points=max_points, name=f"{name}[{backend}]")
    assert report.passed, str(report)


@pytest.mark.parametrize("oracle,extra", [(brute_force, ("optimal",)),
                                          (babai_textbook, ("matches_babai",))])
def test_check_solver_passes_the_oracles(oracle, extra):
    report = check_solver(oracle, properties=DEFAULT_PROPERTIES + extra, max_examples=20,
                          max_n=4, max_box_points=4096)
    assert report.passed, str(report)


# --------------------------------------------------------------------------- oracles
R_DOC = np.array([[1.0, 0.9], [0.0, 0.2]])
Y_DOC = np.array([0.3, 0.11])  # Babai gives [0, 1], the optimum is [0, 0]


def test_brute_force_and_exact_solve_on_the_doc_example():
    bf = brute_force(R_DOC, Y_DOC, 0, 3, n_best=3)
    assert bf.x.tolist() == [0, 0] and bf.status == bils.Status.OPTIMAL
    assert np.all(np.diff(bf.info["best_cost"]) >= 0) and bf.info["best_x"].shape == (3, 2)
    ex = exact_solve(R_DOC, Y_DOC, 0, 3)
    assert ex.x.tolist() == [0, 0]
    cert = ex.info["certificate"]
    assert cert["method"] == "brute_force+enumerate" and int(cert["points"][0]) == 16
    assert cert["runner_up_cost"][0] >= float(ex.cost)
    assert babai_textbook(R_DOC, Y_DOC, 0, 3).x.tolist() == [0, 1]


def test_exact_solve_uses_enumerate_beyond_brute_force():
    rng = np.random.default_rng(3)
    R = np.triu(rng.uniform(-0.5, 0.5, (7, 7)), 1) + np.diag(rng.uniform(1, 2, 7))
    Y = R @ rng.uniform(-20, 20, (7, 2))
    ex = exact_solve(R, Y, -16, 15, max_points=1000)
    assert ex.info["certificate"]["method"] == "enumerate"
    assert np.all(ex.cost <= bils.babai(R, Y, -16, 15, backend="numpy").cost + 1e-9)


def test_exact_solve_cross_check_catches_a_disagreement(monkeypatch):
    import bils.testing.oracles as oracles

    def wrong(case):
        x, cost, nodes = real(case)
        return x, cost + 1.0, nodes

    real = oracles._enumerate
    monkeypatch.setattr(oracles, "_enumerate", wrong)
    with pytest.raises(AssertionError, match="exact oracles disagree on RHS 0"):
        exact_solve(R_DOC, Y_DOC, 0, 3)


def test_oracles_accept_problems_with_orderings_and_design_costs():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((9, 4))
    B = A @ rng.integers(0, 4, (4, 3)) + 0.3 * rng.standard_normal((9, 3))
    for ordering in ("natural", "sqrd", "vblast", "chang_han"):
        p = bils.BILSProblem.from_design(A, B, 0, 3, ordering=ordering)
        en = bils.enumerate(p, backend="numpy")
        assert_feasible(en, p)
        assert_cost_consistent(en, p)
        assert_optimal(en, p)
        # brute force over the caller's coordinates, true residual ||B - A x||^2
        bf = brute_force(p)
        np.testing.assert_allclose(bf.cost, np.sum((B - A @ bf.x) ** 2, axis=0), rtol=1e-9)
        np.testing.assert_allclose(en.cost, bf.cost, rtol=1e-9)


# --------------------------------------------------------------------------- assertions
def test_assertion_messages_show_counterexample_cost_and_optimum():
    res = bils.babai(R_DOC, Y_DOC, 0, 3, backend="numpy")
    with pytest.raises(AssertionError) as info:
        assert_optimal(res, (R_DOC, Y_DOC, 0, 3))
    msg = str(info.value)
    assert "assert_optimal: 1 of 1 right-hand side(s) fail" in msg
    assert "R = np.array([[1. , 0.9]," in msg and "returned x = [0, 1]" in msg
    assert "optimum  x = [0, 0]" in msg and "brute force over 16 box points" in msg


def test_assert_feasible_names_the_violation():
    x = np.array([[0, 4], [1, 1]])
    with pytest.raises(AssertionError, match=r"x\[0\] = 4 is outside the box \[0, 3\]"):
        assert_feasible(x, (np.eye(2), np.zeros((2, 2)), 0, 3))
    with pytest.raises(AssertionError, match="integer dtype"):
        assert_feasible(x.astype(float), (np.eye(2), np.zeros((2, 2)), 0, 3))
    with pytest.raises(AssertionError, match="shape"):
        assert_feasible(x[:, :1], (np.eye(2), np.zeros((2, 2)), 0, 3))


def test_assert_cost_consistent_and_never_worse_than():
    prob = (R_DOC, Y_DOC, 0, 3)
    good = SimpleNamespace(x=np.array([0, 0]), cost=np.float64(np.sum((Y_DOC - 0) ** 2)))
    assert_cost_consistent(good, prob)
    with pytest.raises(AssertionError, match="reported cost 0.5 != recomputed"):
        assert_cost_consistent(SimpleNamespace(x=np.array([0, 0]), cost=np.float64(0.5)), prob)
    opt = brute_force(*prob)
    assert_never_worse_than(opt, babai_textbook, prob)
    with pytest.raises(AssertionError, match="is worse than babai_textbook"):
        assert_never_worse_than(np.array([3, 3]), babai_textbook, prob)


def test_assert_multi_rhs_and_translation_on_planted_bugs():
    rng = np.random.default_rng(0)
    R = np.triu(rng.uniform(-0.5, 0.5, (3, 3)), 1) + np.eye(3)
    case = ProblemCase(R, R @ rng.uniform(-1, 4, (3, 3)), np.zeros((1, 1), np.int64),
                       np.full((1, 1), 3), scale=np.array([[1.0, 0.5, 2.0]]), offset=None)
    assert_multi_rhs_consistent(toy_babai, case)
    with pytest.raises(AssertionError, match="all RHS at once"):
        assert_multi_rhs_consistent(functools.partial(toy_babai, grid_of_first_rhs=True), case)
    tie = ProblemCase(np.eye(1), np.array([[0.5]]), np.array([[0]]), np.array([[3]]),
                      exact=True)
    assert_translation_equivariant(toy_babai, tie, np.array([1]))
    with pytest.raises(AssertionError, match="shift t = \\[1\\]"):
        assert_translation_equivariant(functools.partial(toy_babai, rounding="half_even"),
                                       tie, np.array([1]))
    # comparing costs accepts the other point of a tie
    assert_translation_equivariant(functools.partial(toy_babai, rounding="half_even"),
                                   tie, np.array([1]), compare="cost")


def test_assert_recovers_and_same_solution():
    R = np.array([[2.0, 1.0], [0.0, 1.0]])
    case = ProblemCase(R, R @ np.array([[1.0], [3.0]]), np.zeros((1, 1), np.int64),
                       np.full((1, 1), 3), x_true=np.array([[1], [3]]))
    assert_recovers(bils.babai(case.R, case.Y, 0, 3, backend="numpy"), case)
    with pytest.raises(AssertionError, match="planted x_true"):
        assert_recovers(np.array([[1], [2]]), case)
    with pytest.raises(ValueError, match="no `x_true`"):
        assert_recovers(np.array([[1], [3]]), ProblemCase(R, case.Y, case.lo, case.hi))
    with pytest.raises(ValueError, match="`compare` must be one of"):
        assert_same_solution(np.array([[1], [3]]), np.array([[1], [3]]), case, compare="both")


def test_as_case_rejects_garbage():
    with pytest.raises(TypeError, match="`problem` must be a ProblemCase"):
        assert_feasible(np.zeros(2, np.int64), "not a problem")


def test_properties_table_is_consistent():
    assert set(DEFAULT_PROPERTIES) <= set(PROPERTIES)
    assert {"feasible", "cost_consistent", "multi_rhs", "translation_equivariant",
            "noiseless_recovery"} == set(DEFAULT_PROPERTIES)
    for p in PROPERTIES.values():
        assert p.example in {"case", "multi", "shifted", "noiseless", "small"}


# --------------------------------------------------------------------------- lazy imports
def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_importing_bils_and_bils_testing_does_not_import_hypothesis():
    r = _run("""
        import sys, bils, bils.testing
        from bils.testing import assert_feasible, brute_force
        assert "hypothesis" not in sys.modules, "hypothesis imported"
        import bils.testing.strategies
        assert "hypothesis" in sys.modules
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_missing_hypothesis_gives_a_clear_import_error():
    r = _run("""
        import sys
        sys.modules["hypothesis"] = None  # as if not installed
        import bils.testing
        import numpy as np
        bils.testing.assert_feasible(np.zeros(1, np.int64), (np.eye(1), np.zeros(1), 0, 1))
        for name in ("check_solver", "strategies"):
            try:
                getattr(bils.testing, name)
            except ImportError as exc:
                assert "pip install 'bils[test]'" in str(exc), exc
            else:
                raise SystemExit(name + " imported without hypothesis")
        try:
            import bils.testing.strategies
        except ImportError as exc:
            assert "bils[test]" in str(exc), exc
        else:
            raise SystemExit("strategies imported without hypothesis")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr + r.stdout


# --------------------------------------------------------------------------- the docs page
def test_docs_walkthrough_runs():
    """docs/testing.md: the toy solver fails translation equivariance; the fix passes."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    toy, fix = blocks[0], blocks[2].strip()
    ns: dict = {}
    exec(toy, ns)  # noqa: S102 - our own documentation
    report = check_solver(ns["my_babai"], max_examples=50)
    assert report.failed == ["translation_equivariant"], str(report)
    assert "R = np.array([[1.]])" in report["translation_equivariant"].counterexample
    bad_line = next(line for line in toy.splitlines() if "np.round" in line)
    ns = {}
    exec(toy.replace(bad_line.strip(), fix), ns)  # noqa: S102
    assert check_solver(ns["my_babai"], max_examples=50,
                        properties=DEFAULT_PROPERTIES + ("matches_babai",)).passed

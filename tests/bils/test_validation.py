"""Input validation: only documented exceptions escape, and every message is pinned.

The fuzz test corrupts one argument of a valid call at a time and requires that the call
either succeeds or raises ``ValueError`` / ``TypeError`` whose message names the corrupted
argument in backticks. The ``pytest.raises(..., match=...)`` tests pin each message of
``bils/_validate.py`` and ``bils/problem.py``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bils
from bils._validate import choice_iv, float_iv, int_iv, problem_iv, triangular_iv

R2 = np.array([[2.0, 1.0], [0.0, 1.0]])
Y2 = np.array([[1.2, 0.3], [2.9, -1.0]])


class Exotic:
    """An object numpy cannot turn into an array."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("no array for you")


# --------------------------------------------------------------------------- fuzz
BAD_MATRIX = [
    ("1-D", np.ones(2)), ("3-D", np.ones((2, 2, 1))), ("non-square", np.ones((2, 3))),
    ("lower", np.array([[1.0, 0.0], [1.0, 1.0]])), ("zero diag", np.array([[1.0, 1.0], [0, 0]])),
    ("nan", np.array([[np.nan, 0], [0, 1.0]])), ("inf", np.array([[np.inf, 0], [0, 1.0]])),
    ("bool", np.eye(2, dtype=bool)), ("complex", np.eye(2) + 0j), ("str", np.array([["a", "b"],
                                                                                   ["c", "d"]])),
    ("None", None), ("ragged", [[1.0, 2.0], [1.0]]), ("empty", np.zeros((0, 0))),
    ("object", np.array([[1, None], [0, 1]], dtype=object)), ("exotic", Exotic()),
    ("scalar", 3.0), ("huge", np.array([[1e308, 1e308], [0, 1e308]])),
]
BAD_Y = [
    ("wrong rows", np.ones((3, 2))), ("3-D", np.ones((2, 2, 1))), ("0-d", np.float64(1.0)),
    ("nan", np.array([np.nan, 1.0])), ("inf", np.array([[np.inf], [1.0]])),
    ("complex", np.ones(2) + 1j), ("bool", np.ones(2, dtype=bool)), ("no columns", np.ones((2, 0))),
    ("None", None), ("str", ["a", "b"]), ("exotic", Exotic()), ("ragged", [[1.0], [1.0, 2.0]]),
]
BAD_BOUND = [
    ("fraction", 0.5), ("nan", np.nan), ("inf", np.inf), ("bool", True), ("complex", 1j),
    ("huge float", 1e300), ("wrong shape", np.zeros((3, 3), dtype=np.int64)),
    ("3-D", np.zeros((2, 2, 2), dtype=np.int64)), ("None", None), ("str", "0"),
    ("exotic", Exotic()), ("big int", 2**70), ("fraction array", np.array([0.0, 0.25])),
]
BAD_GRID = [
    ("nan", np.nan), ("inf", np.inf), ("bool", True), ("complex", 1j), ("wrong shape", np.ones(3)),
    ("3-D", np.ones((2, 2, 2))), ("str", "1"), ("exotic", Exotic()),
    ("ragged", [[1.0], [1.0, 2.0]]),
]
BAD_SCALE = BAD_GRID + [("zero", 0.0), ("zero entry", np.array([[1.0], [0.0]]))]
BAD_INT_OPTION = [0, -1, 1.5, True, "3", np.nan, [2], 10**30 * 1.0]
BAD_BACKEND = ["gpu", None, 3, "NUMPY", ""]

SOLVER_OPTIONS = {
    "babai": {"block_size": BAD_INT_OPTION},
    "klein": {"n_samples": [-1, 1.5, True, "8", None], "tau": ["x", -1.0, np.nan, np.inf, None,
                                                            True], "block_size": BAD_INT_OPTION,
              "rng": ["seed", -5, 1.5]},
    "kbest": {"beam_width": BAD_INT_OPTION, "n_children": [0, -2, 2.5, True, "2"]},
    "enumerate": {"max_nodes": [0, -1, 2.5, True, "100"], "n_best": BAD_INT_OPTION},
}
SOLVERS = {"babai": bils.babai, "klein": bils.klein, "kbest": bils.kbest,
           "enumerate": bils.enumerate}

# a backticked span naming the argument: `lo`, or `A.shape[0]` (names `A`)
_NAMED = re.compile(r"`([A-Za-z_][A-Za-z_0-9]*)[`.]")


def _call_and_check(fn, corrupted, *args, **kwargs):
    """Call ``fn``: success, or ValueError/TypeError naming ``corrupted`` in backticks."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        names = set(_NAMED.findall(str(exc)))
        assert corrupted in names, (
            f"{type(exc).__name__} for a bad `{corrupted}` does not name it: {exc!r}")
    # any other exception propagates and fails the test


@given(data=st.data(), solver=st.sampled_from(sorted(SOLVERS)),
       arg=st.sampled_from(["R", "Y", "lo", "hi", "scale", "offset", "option", "backend"]))
@settings(max_examples=400)
def test_fuzz_solver_arguments(data, solver, arg):
    args = {"R": R2, "Y": Y2, "lo": 0, "hi": 3}
    kwargs = {"scale": None, "offset": None, "backend": "numpy"}
    name = arg
    if arg == "R":
        args["R"] = data.draw(st.sampled_from(BAD_MATRIX), label="R")[1]
    elif arg == "Y":
        args["Y"] = data.draw(st.sampled_from(BAD_Y), label="Y")[1]
    elif arg in ("lo", "hi"):
        bad = data.draw(st.sampled_from(BAD_BOUND + [("crossed", -1 if arg == "hi" else 4)]),
                        label=arg)[1]
        args[arg] = bad
    elif arg == "scale":
        kwargs["scale"] = data.draw(st.sampled_from(BAD_SCALE), label="scale")[1]
    elif arg == "offset":
        kwargs["offset"] = data.draw(st.sampled_from(BAD_GRID), label="offset")[1]
    elif arg == "backend":
        kwargs["backend"] = data.draw(st.sampled_from(BAD_BACKEND), label="backend")
    else:
        opts = SOLVER_OPTIONS[solver]
        name = data.draw(st.sampled_from(sorted(opts)), label="option")
        kwargs[name] = data.draw(st.sampled_from(opts[name]), label=name)
    fn = SOLVERS[solver]
    _call_and_check(fn, name, args["R"], args["Y"], args["lo"], args["hi"], **kwargs)


H3 = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]])
T3 = np.array([[0.4, 1.2], [2.6, 0.1], [1.1, 2.2]])
A4 = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
B4 = A4 @ np.array([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
ORDERINGS = ["natural", "diag", "sqrd", "vblast", "minpivot", "chang_han"]


@given(data=st.data(), ctor=st.sampled_from(["from_triangular", "from_design", "from_gram"]),
       which=st.sampled_from(["matrix", "targets", "lo", "hi", "scale", "offset", "ordering",
                              "damp"]),
       ordering=st.sampled_from(ORDERINGS))
@settings(max_examples=300)
def test_fuzz_problem_constructors(data, ctor, which, ordering):
    mat_name, tgt_name = {"from_triangular": ("R", "Y"), "from_design": ("A", "B"),
                          "from_gram": ("H", "T")}[ctor]
    mat = {"from_triangular": np.triu(H3), "from_design": A4, "from_gram": H3}[ctor]
    tgt = {"from_triangular": T3, "from_design": B4, "from_gram": T3}[ctor]
    kw = {"ordering": ordering}
    lo, hi = 0, 3
    name = which
    if which == "matrix":
        name = mat_name
        extra = {"from_gram": [("asymmetric", np.triu(H3)), ("indefinite", -H3),
                               ("singular", np.ones((3, 3)))],
                 "from_design": [("wide", A4.T), ("rank deficient", np.ones((4, 3)))],
                 "from_triangular": []}[ctor]
        mat = data.draw(st.sampled_from(BAD_MATRIX + extra), label=name)[1]
    elif which == "targets":
        name = tgt_name
        tgt = data.draw(st.sampled_from(BAD_Y), label=name)[1]
    elif which in ("lo", "hi"):
        v = data.draw(st.sampled_from(BAD_BOUND + [("crossed", -1 if which == "hi" else 4)]),
                      label=which)[1]
        lo, hi = (v, hi) if which == "lo" else (lo, v)
    elif which == "scale":
        kw["scale"] = data.draw(st.sampled_from(BAD_SCALE), label="scale")[1]
    elif which == "offset":
        kw["offset"] = data.draw(st.sampled_from(BAD_GRID), label="offset")[1]
    elif which == "ordering":
        kw["ordering"] = data.draw(st.sampled_from(["", "act_order", None, 3, "DIAG"]))
    else:
        if ctor != "from_gram":
            return
        kw["damp"] = data.draw(st.sampled_from([-0.1, np.nan, np.inf, "0.01", True, None]))
    _call_and_check(getattr(bils.BILSProblem, ctor), name, mat, tgt, lo, hi, **kw)


# --------------------------------------------------------------------------- pinned messages
def _babai(*args, **kwargs):
    return bils.babai(*args, backend="numpy", **kwargs)


class TestValidateMessages:
    """Each message of bils/_validate.py (and the driver's), pinned."""

    def test_required(self):
        with pytest.raises(TypeError, match=r"^`R` is required$"):
            _babai(None, Y2, 0, 3)
        with pytest.raises(TypeError, match=r"`R`, `Y`, `lo` and `hi` are required"):
            _babai(R2, Y2)
        with pytest.raises(TypeError, match=r"^`lo` is required$"):
            problem_iv(R2, Y2, None, 3)

    def test_problem_and_arrays_together(self):
        p = bils.BILSProblem.from_triangular(R2, Y2, 0, 3)
        with pytest.raises(TypeError, match="when the first argument is a BILSProblem, `Y`"):
            _babai(p, Y2)

    def test_array_like(self):
        with pytest.raises(TypeError, match=r"^`R` must be array_like of real numbers$"):
            _babai(Exotic(), Y2, 0, 3)
        with pytest.raises(TypeError, match=r"^`Y` must be array_like of real numbers$"):
            _babai(R2, [[1.0], [1.0, 2.0]], 0, 3)

    def test_real_dtype(self):
        with pytest.raises(TypeError, match=r"^`Y` must hold real numbers, got dtype complex128$"):
            _babai(R2, Y2 + 1j, 0, 3)
        with pytest.raises(TypeError, match=r"^`R` must hold real numbers, got dtype <U1$"):
            _babai(np.array([["a", "b"], ["c", "d"]]), Y2, 0, 3)
        with pytest.raises(TypeError, match=r"^`hi` must hold real numbers, got dtype object$"):
            _babai(R2, Y2, 0, 2**70)

    def test_not_booleans(self):
        with pytest.raises(TypeError, match=r"^`lo` must hold real numbers, not booleans$"):
            _babai(R2, Y2, False, 3)
        with pytest.raises(TypeError, match=r"^`scale` must hold real numbers, not booleans$"):
            _babai(R2, Y2, 0, 3, scale=True)

    def test_finite(self):
        for name, kw, args in [("R", {}, (np.array([[np.nan, 0], [0, 1.0]]), Y2, 0, 3)),
                               ("Y", {}, (R2, np.full((2, 2), np.inf), 0, 3)),
                               ("lo", {}, (R2, Y2, np.nan, 3)),
                               ("hi", {}, (R2, Y2, 0, np.inf)),
                               ("scale", {"scale": np.nan}, (R2, Y2, 0, 3)),
                               ("offset", {"offset": -np.inf}, (R2, Y2, 0, 3))]:
            with pytest.raises(ValueError, match=rf"^`{name}` must be finite \(no NaN or inf\)$"):
                _babai(*args, **kw)

    def test_broadcastable(self):
        with pytest.raises(ValueError, match=r"^`lo` must be broadcastable to `Y.shape` \(2, 2\), "
                                             r"got shape \(3,\)$"):
            _babai(R2, Y2, np.zeros(3, dtype=int), 3)
        with pytest.raises(ValueError, match=r"^`offset` must be broadcastable to `Y.shape`"):
            _babai(R2, Y2, 0, 3, offset=np.ones((2, 2, 2)))
        with pytest.raises(ValueError, match=r"^`scale` must be broadcastable to `Y.shape` \(2, 1\)"):
            _babai(R2, Y2[:, 0], 0, 3, scale=np.ones(3))

    def test_square(self):
        with pytest.raises(ValueError, match=r"^`R` must be a square 2-D array, got shape \(2, 3\)$"):
            _babai(np.ones((2, 3)), Y2, 0, 3)

    def test_at_least_one_row(self):
        with pytest.raises(ValueError, match=r"^`R` must have at least one row$"):
            _babai(np.zeros((0, 0)), np.zeros(0), 0, 3)

    def test_upper_triangular(self):
        with pytest.raises(ValueError, match=r"^`R` must be upper triangular \(entries below the "
                                             r"diagonal must be 0\)$"):
            _babai(R2.T, Y2, 0, 3)

    def test_nonzero_diagonal(self):
        with pytest.raises(ValueError, match=r"^`R` must have a non-zero diagonal$"):
            _babai(np.array([[1.0, 1.0], [0.0, 0.0]]), Y2, 0, 3)
        with pytest.raises(ValueError, match=r"^`G` must have a non-zero diagonal$"):
            triangular_iv(np.zeros((1, 1)), name="G")

    def test_y_dimensions(self):
        with pytest.raises(ValueError, match=r"^`Y` must be 1-D \(n,\) or 2-D \(n, k\), got 3-D$"):
            _babai(R2, np.ones((2, 2, 1)), 0, 3)
        with pytest.raises(ValueError, match=r"^`Y` must have `R.shape\[0\]` = 2 rows, got 3$"):
            _babai(R2, np.ones(3), 0, 3)
        with pytest.raises(ValueError, match=r"^`Y` must have at least one column$"):
            _babai(R2, np.ones((2, 0)), 0, 3)

    def test_integer_bounds(self):
        with pytest.raises(ValueError, match=r"^`lo` must hold integers$"):
            _babai(R2, Y2, 0.5, 3)
        with pytest.raises(ValueError, match=r"^`hi` must have magnitude <= 2\*\*52$"):
            _babai(R2, Y2, 0, 1e300)
        with pytest.raises(ValueError, match=r"^`lo` must not exceed `hi` \(elementwise\)$"):
            _babai(R2, Y2, np.array([[0], [4]]), 3)

    def test_scale_nonzero(self):
        with pytest.raises(ValueError, match=r"^`scale` must be non-zero$"):
            _babai(R2, Y2, 0, 3, scale=np.array([[1.0], [0.0]]))

    def test_int_option(self):
        with pytest.raises(TypeError, match=r"^`block_size` must be an integer, got float$"):
            _babai(R2, Y2, 0, 3, block_size=2.0)
        with pytest.raises(TypeError, match=r"^`block_size` must be an integer, got bool$"):
            _babai(R2, Y2, 0, 3, block_size=True)
        with pytest.raises(ValueError, match=r"^`block_size` must be >= 1, got 0$"):
            _babai(R2, Y2, 0, 3, block_size=0)
        assert int_iv("m", None, allow_none=True) is None
        assert int_iv("m", np.int64(3), minimum=1) == 3

    def test_float_option(self):
        with pytest.raises(TypeError, match=r"^`tau` must be a real number, got str$"):
            bils.klein(R2, Y2, 0, 3, tau="hot", backend="numpy")
        with pytest.raises(ValueError, match=r"^`tau` must be finite$"):
            bils.klein(R2, Y2, 0, 3, tau=np.inf, backend="numpy")
        with pytest.raises(ValueError, match=r"^`x` must be > 0, got 0.0$"):
            float_iv("x", 0, positive=True)
        with pytest.raises(TypeError, match=r"^`x` must be a real number, got bool$"):
            float_iv("x", True)
        assert float_iv("x", None, allow_none=True) is None

    def test_choice_option(self):
        with pytest.raises(ValueError, match=r"^`backend` must be one of \('auto', 'numpy', "
                                             r"'numba', 'cupy'\), got 'gpu'$"):
            _babai.__wrapped__ if False else bils.babai(R2, Y2, 0, 3, backend="gpu")
        with pytest.raises(ValueError, match=r"^`ordering` must be one of .* got 'act_order'$"):
            choice_iv("ordering", "act_order", ("natural", "diag"))


class TestSolverOptionMessages:
    def test_klein(self):
        with pytest.raises(ValueError, match=r"^`tau` must be 'auto' or a float >= 0, got -1.0$"):
            bils.klein(R2, Y2, 0, 3, tau=-1.0, backend="numpy")
        with pytest.raises(ValueError, match=r"^`n_samples` must be >= 0, got -1$"):
            bils.klein(R2, Y2, 0, 3, n_samples=-1, backend="numpy")

    def test_kbest(self):
        with pytest.raises(ValueError, match=r"^`beam_width` must be >= 1, got 0$"):
            bils.kbest(R2, Y2, 0, 3, beam_width=0, backend="numpy")
        with pytest.raises(ValueError, match=r"^`n_children` must be >= 1, got 0$"):
            bils.kbest(R2, Y2, 0, 3, n_children=0, backend="numpy")

    def test_enumerate(self):
        with pytest.raises(ValueError, match=r"^`max_nodes` must be >= 1, got 0$"):
            bils.enumerate(R2, Y2, 0, 3, max_nodes=0, backend="numpy")
        with pytest.raises(ValueError, match=r"^`n_best` must be >= 1, got 0$"):
            bils.enumerate(R2, Y2, 0, 3, n_best=0, backend="numpy")


class TestProblemMessages:
    """Each message of bils/problem.py (and the orderings it calls), pinned."""

    def test_from_design(self):
        P = bils.BILSProblem
        with pytest.raises(ValueError, match=r"^`A` must be a 2-D \(m, n\) array with m >= n >= 1, "
                                             r"got shape \(3, 4\)$"):
            P.from_design(A4.T, B4[:3], 0, 3)
        with pytest.raises(ValueError, match=r"^`A` must be finite$"):
            P.from_design(np.where(A4 == 0, np.nan, A4), B4, 0, 3)
        with pytest.raises(ValueError, match=r"^`B` must have `A.shape\[0\]` = 4 rows, got shape "
                                             r"\(3, 2\)$"):
            P.from_design(A4, B4[:3], 0, 3)
        with pytest.raises(ValueError, match=r"^`B` must be finite$"):
            P.from_design(A4, B4 * np.inf, 0, 3)
        with pytest.raises(ValueError, match=r"^`A` must have full column rank$"):
            P.from_design(np.ones((4, 3)), B4, 0, 3)
        with pytest.raises(TypeError, match=r"^`A` is required$"):
            P.from_design(None, B4, 0, 3)

    def test_from_gram(self):
        P = bils.BILSProblem
        with pytest.raises(ValueError, match=r"^`H` must be a square 2-D array, got shape \(3,\)$"):
            P.from_gram(np.ones(3), T3, 0, 3)
        with pytest.raises(ValueError, match=r"^`H` must be finite$"):
            P.from_gram(H3 * np.nan, T3, 0, 3)
        with pytest.raises(ValueError, match=r"^`H` must be symmetric$"):
            P.from_gram(np.triu(H3), T3, 0, 3)
        with pytest.raises(ValueError, match=r"^`damp` must be >= 0, got -0.1$"):
            P.from_gram(H3, T3, 0, 3, damp=-0.1)
        with pytest.raises(TypeError, match=r"^`damp` must be a real number, got str$"):
            P.from_gram(H3, T3, 0, 3, damp="0.01")
        with pytest.raises(ValueError, match=r"^`T` must have `H.shape\[0\]` = 3 rows, got shape "
                                             r"\(2, 2\)$"):
            P.from_gram(H3, T3[:2], 0, 3)
        with pytest.raises(ValueError, match=r"^`T` must be finite$"):
            P.from_gram(H3, T3 * np.inf, 0, 3)
        with pytest.raises(ValueError, match=r"^`H` \(after damping\) must be positive definite; "
                                             r"increase `damp`$"):
            P.from_gram(-H3, T3, 0, 3)

    @pytest.mark.parametrize("i, j", [(3, 598), (598, 3), (300, 301), (255, 256), (599, 0)])
    def test_from_gram_symmetry_across_tiles(self, i, j):
        """The symmetry check compares tiles of 256 with their mirrors: an asymmetric entry in
        any tile (inside one, on a tile edge, far from the diagonal) is found; within the
        tolerance it is not."""
        from bils.problem import _is_symmetric

        rng = np.random.default_rng(0)
        X = rng.standard_normal((600, 700))
        H = X @ X.T / 700
        H = (H + H.T) / 2
        assert _is_symmetric(H)
        bad = H.copy()
        bad[i, j] += 1e-6
        assert not _is_symmetric(bad)
        with pytest.raises(ValueError, match=r"^`H` must be symmetric$"):
            bils.BILSProblem.from_gram(bad, np.zeros(600), 0, 3)
        near = H.copy()
        near[i, j] *= 1 + 1e-12  # inside the tolerance
        assert _is_symmetric(near)

    def test_orderings(self):
        P = bils.BILSProblem
        with pytest.raises(ValueError, match=r"^`ordering` must be one of \('natural', 'reverse', 'diag', "
                                             r"'sqrd', 'vblast', 'minpivot'.*got 'act_order'$"):
            P.from_triangular(R2, Y2, 0, 3, ordering="act_order")
        with pytest.raises(ValueError, match=r"^`ordering` must be one of"):
            P.from_gram(H3, T3, 0, 3, ordering=None)
        with pytest.raises(ValueError, match=r"^`G` must be a square 2-D array, got shape \(3,\)$"):
            bils.column_order(np.ones(3), "diag")
        with pytest.raises(ValueError, match=r"^`G` must be finite$"):
            bils.column_order(H3 * np.nan, "sqrd")
        with pytest.raises(ValueError, match=r"^`G` must be positive definite for this ordering$"):
            bils.column_order(-H3, "sqrd")

    def test_grid_shape_of_a_problem(self):
        from bils.problem import _grid_2d

        with pytest.raises(ValueError, match=r"^`scale` of shape \(3, 3\) must be broadcastable "
                                             r"to \(2, 4\)$"):
            _grid_2d("scale", np.ones((3, 3)), 2, 4, 1.0, False)


class TestCoreValidationGaps:
    """Inputs that currently escape validation (core bugs: these tests fail until fixed)."""

    @pytest.mark.parametrize("ordering", ["sqrd", "vblast", "minpivot"])
    def test_singular_gram_with_a_pivoting_ordering_names_H(self, ordering):
        # bils/problem.py from_gram: column_order(H, ...) runs before the Cholesky check and
        # raises LinAlgError("Singular matrix") or "`G` must be positive definite".
        H = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        with pytest.raises(ValueError, match=r"^`H` \(after damping\) must be positive definite"):
            bils.BILSProblem.from_gram(H, T3, 0, 3, ordering=ordering)

    @pytest.mark.parametrize("name", ["lo", "hi", "scale", "offset"])
    def test_from_gram_validates_grid_arguments_before_permuting_them(self, name):
        # bils/problem.py _rows2: np.asarray(a) on the raw argument, before problem_iv.
        kw = {"lo": 0, "hi": 3, "scale": None, "offset": None, name: [[1.0], [1.0, 2.0]]}
        with pytest.raises((ValueError, TypeError), match=rf"`{name}`"):
            bils.BILSProblem.from_gram(H3, T3, kw["lo"], kw["hi"], scale=kw["scale"],
                                       offset=kw["offset"], ordering="diag")

    @pytest.mark.parametrize("rng", ["seed", -5, 1.5])
    def test_klein_validates_rng(self, rng):
        # bils/klein.py: np.random.default_rng(rng) errors escape without naming `rng`.
        with pytest.raises((ValueError, TypeError), match=r"`rng`"):
            bils.klein(R2, Y2, 0, 3, rng=rng, backend="numpy")


# ---------------------------------------------------------------------- cheap per-call checks
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (2, 7), (4, 19)])
def test_finite_check_by_reductions_finds_every_non_finite_value(bad, where):
    # _finite uses min/max (they propagate NaN and reach ±inf) instead of isfinite + all
    Y = np.random.default_rng(0).standard_normal((5, 20))
    R = np.eye(5)
    problem_iv(R, Y, -3, 3)
    Y[where] = bad
    with pytest.raises(ValueError, match=r"^`Y` must be finite \(no NaN or inf\)$"):
        problem_iv(R, Y, -3, 3)


def test_abs_range_equals_the_min_and_max_of_the_absolute_values():
    from bils._guard import _abs_range

    a = np.random.default_rng(1).standard_normal((6, 9))
    a[:, 0] = -np.abs(a[:, 0])
    a[:, 1] = np.abs(a[:, 1])
    for axis in (0, 1):
        amin, amax = _abs_range(a, axis)
        np.testing.assert_array_equal(amax, np.abs(a).max(axis=axis))
        np.testing.assert_array_equal(amin, np.abs(a).min(axis=axis))
        assert _abs_range(a, axis, need_min=False)[0] is None


@pytest.mark.parametrize("lo, hi", [(0, 3), (np.zeros((4, 1)), np.full((4, 1), 3)),
                                    (np.zeros((1, 6)), np.full((4, 6), 3))])
@pytest.mark.parametrize("where, value", [((0, 0), -1), ((3, 5), 4), ((2, 1), 9)])
def test_output_check_names_the_first_code_outside_the_box(lo, hi, where, value):
    # shared bounds take the per-level min/max path, per-RHS bounds the elementwise one
    from bils._guard import check_output

    R = np.eye(4)
    can = problem_iv(R, np.zeros((4, 6)), lo, hi)
    x = np.ones((4, 6), dtype=np.int64)
    check_output("babai", can, x, np.zeros(6))
    check_output("babai", can, x.astype(np.int8), np.zeros(6))
    x[where] = value
    with pytest.raises(ValueError, match=rf"outside the box at level {where[0]}, RHS {where[1]}:"):
        check_output("babai", can, x, np.zeros(6))

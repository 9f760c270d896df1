"""Fuzz every public entry point of ``bils`` (and llm_adapter's loaders) with hostile inputs.

Each case is drawn from its own seed (so any case can be replayed: ``--replay SEED``),
run in a worker process, and classified:

``error``    a clear error: ``ValueError`` / ``TypeError`` (or the loaders'
             ``QuantizedFormatError``) whose message names an argument (a backquoted name)
             or the file — and the same error type on the numpy and numba backends;
``correct``  a result that passes the oracles: codes integral and inside the box, finite
             costs equal to the cost identity :math:`\\lVert y - R(s\\circ x+o)\\rVert^2`,
             brute force over the box for exact search (small ``n``), never worse than
             Babai for K-best/Klein, backends agreeing, loaders returning what was saved;
``wrong``    a result that fails an oracle, backends disagreeing, or a loader returning
             other data than was saved without an error (a silent wrong result);
``crash``    any other exception, or the worker process dying;
``hang``     no answer within the per-case timeout (the worker is killed).

Valid inputs whose documented work is large by design (an unbudgeted exact search over a
wide box, Klein with a huge temperature over a wide box) are kept cheap — a budget or a
smaller ``tau`` — so that a hang means an unexpected loop, not an expensive request.

Usage::

    python benchmarks/fuzz.py --cases 10000 [--workers 2] [--timeout 20] [--part bils|loaders|all]

writes ``benchmarks/results/fuzz.json`` with counts per entry point and outcome (bils and
loaders reported separately) and the seeds of every non-clean case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

OUTCOMES = ("error", "correct", "wrong", "crash", "hang")

# ---------------------------------------------------------------------------- generators
SOLVER_ENTRIES = ("babai", "klein", "kbest", "enumerate")
PROBLEM_ENTRIES = ("BILSProblem.from_triangular", "BILSProblem.from_design",
                   "BILSProblem.from_gram", "BILSProblem.fields", "BILSProblem.cost")
OTHER_ENTRIES = ("column_order", "joint_target", "alpha_closed_form", "JointStats.add",
                 "lattice.encode", "lattice.decode", "lattice.fit_generator")
BILS_ENTRIES = SOLVER_ENTRIES + PROBLEM_ENTRIES + OTHER_ENTRIES
LOADER_ENTRIES = ("load_quantized.roundtrip", "load_quantized.byteflip_tensor",
                  "load_quantized.byteflip_config", "export_gptq.roundtrip",
                  "checkpoint.roundtrip", "checkpoint.byteflip")


#: Per-case switch: a hostile case poisons inputs and options, a clean one draws
#: well-posed problems only (so the oracles see many solved problems).
_MODE = {"hostile": True}


def _magnitude(rng):
    """A positive magnitude: mostly ordinary, sometimes extreme or subnormal."""
    u = rng.random()
    if not _MODE["hostile"]:
        u *= 0.85
    if u < 0.7:
        return float(10 ** rng.uniform(-1, 1))
    if u < 0.85:
        return float(10 ** rng.uniform(-20, 20))
    if u < 0.95:
        return float(10 ** rng.uniform(-330, 308))
    return float(rng.choice([5e-324, 1e-310, 1e-160, 1e154, 1e200, 1.7e308]))


def _hostile_array(rng, a):
    """Occasionally poison an array: NaN, inf, huge, tiny, wrong shape, complex, bool, list."""
    a = np.array(a, dtype=np.float64, copy=True)
    u = rng.random()
    if u < 0.75 or a.size == 0 or not _MODE["hostile"]:
        return a
    idx = tuple(rng.integers(0, s) for s in a.shape)
    if u < 0.80:
        a[idx] = np.nan
    elif u < 0.84:
        a[idx] = rng.choice([np.inf, -np.inf])
    elif u < 0.88:
        a[idx] = rng.choice([1e300, -1e300, 1e-300, 5e-324, 1e154])
    elif u < 0.91:
        return a.reshape(-1)[: max(1, a.size - 1)]
    elif u < 0.93:
        return a.astype(np.complex128)
    elif u < 0.95:
        return a > 0
    elif u < 0.97:
        return a.tolist()
    elif u < 0.985:
        return a.astype(np.float32)
    else:
        return a[None]
    return a


def _bound(rng, base):
    """A box bound in some dtype, sometimes hostile."""
    u = rng.random()
    if u < 0.6 or not _MODE["hostile"]:
        return int(base)
    if u < 0.7:
        dt = np.dtype(str(rng.choice(["int8", "int32", "int64", "uint8", "uint64", "float64", "float32"])
                          if base >= 0 else rng.choice(["int8", "int32", "int64", "float64"])))
        if dt.kind in "iu" and not np.iinfo(dt).min <= base <= np.iinfo(dt).max:
            dt = np.dtype(np.int64)
        return np.array(base, dtype=dt)
    if u < 0.75:
        return base + 0.5
    if u < 0.8:
        return rng.choice([np.uint64(2**64 - 1), np.int64(2**62), 2**52, -2**52, 2**53, 1e300,
                           np.int64(-2**63), np.uint64(2**53)])
    if u < 0.83:
        return np.nan
    if u < 0.86:
        return True
    if u < 0.9:
        return np.full(rng.integers(1, 4), base)
    return int(base)


def _triangular(rng, n):
    R = np.triu(rng.standard_normal((n, n)))
    R[np.diag_indices(n)] = np.abs(R[np.diag_indices(n)]) + 0.5
    if rng.random() < 0.25:
        R[np.diag_indices(n)] *= np.array([_magnitude(rng) for _ in range(n)])
    if rng.random() < 0.1:
        R *= _magnitude(rng)
    if rng.random() < 0.05:
        R[rng.integers(0, n), rng.integers(0, n)] = 0.0  # maybe a zero diagonal
    if rng.random() < 0.05 and n > 1:
        R[n - 1, 0] = 1.0  # not triangular
    return R


def _solver_inputs(rng):
    n = int(rng.integers(1, 6)) if rng.random() < 0.9 else int(rng.integers(6, 41))
    k = int(rng.integers(1, 4)) if rng.random() < 0.9 else int(rng.integers(4, 300))
    squeeze = rng.random() < 0.3
    R = _triangular(rng, n)
    width = int(rng.choice([1, 2, 3, 4, 8, 16, 2**20]))
    lo = int(rng.integers(-width, 1))
    hi = lo + int(rng.integers(0, width + 1))
    x0 = rng.integers(lo, hi + 1, size=(n, k)).astype(np.float64)
    s = None
    o = None
    if rng.random() < 0.5:
        s = rng.uniform(0.1, 2.0, size=(n, 1) if rng.random() < 0.5 else (1, k))
        if rng.random() < 0.2:
            s = s * _magnitude(rng)
        if rng.random() < 0.05:
            s = np.zeros_like(s)
    if rng.random() < 0.3:
        o = rng.standard_normal((n, 1))
    S = 1.0 if s is None else np.broadcast_to(s, (n, k))
    O = 0.0 if o is None else np.broadcast_to(o, (n, k))
    Y = R @ (S * x0 + O) + rng.standard_normal((n, k)) * rng.choice([0.1, 1.0, 10.0])
    if rng.random() < 0.05:
        Y = Y * _magnitude(rng)
    if squeeze:
        Y = Y[:, 0]
        if s is not None:
            s = s[:, 0] if s.shape[0] == n else s[0, :1]
        if o is not None:
            o = o[:, 0]
    args = [_hostile_array(rng, R), _hostile_array(rng, Y), _bound(rng, lo), _bound(rng, hi)]
    kw = {}
    if s is not None:
        kw["scale"] = _hostile_array(rng, s)
    if o is not None:
        kw["offset"] = _hostile_array(rng, o)
    if rng.random() < 0.03:
        args[2], args[3] = args[3], args[2]  # lo > hi
    return args, kw


def _option(rng, good, bad):
    if rng.random() < 0.85 or not _MODE["hostile"]:
        return good
    return bad[int(rng.integers(0, len(bad)))]


def _solver_options(rng, name):
    common_bad = [0, -1, True, 2.5, "3", None, 10**30]
    if name == "babai":
        return {"block_size": _option(rng, int(rng.integers(1, 5)), common_bad),
                "precision": _option(rng, str(rng.choice(["float64", "float32"])), ["float16", 3])}
    if name == "klein":
        return {"n_samples": _option(rng, int(rng.integers(0, 6)), [-1, True, 10**13, 2.0]),
                "tau": _option(rng, "auto" if rng.random() < 0.6 else float(10 ** rng.uniform(-3, 2)),
                               [-1.0, np.nan, np.inf, 1e300, "hot", 1e30]),
                "rng": _option(rng, int(rng.integers(0, 1000)), [-1, "x", 1.5]),
                "block_size": _option(rng, int(rng.integers(1, 5)), common_bad)}
    if name == "kbest":
        return {"beam_width": _option(rng, int(rng.integers(1, 6)), common_bad + [10**5]),
                "n_children": _option(rng, None if rng.random() < 0.5 else int(rng.integers(1, 6)),
                                      [0, -2, 10**5, 1.5])}
    return {"max_nodes": _option(rng, None if rng.random() < 0.7 else int(rng.integers(1, 50)),
                                 [0, -5, 2**70, 1.5, True]),
            "n_best": _option(rng, int(rng.integers(1, 4)), [0, -1, 10**12, 2.0])}


# ---------------------------------------------------------------------------- oracles
class Wrong(AssertionError):
    """An oracle failed: the result is silently wrong."""


class ClearError(Exception):
    """A loader raised a clear error (its type and message are in the text)."""


def _check(cond, msg):
    if not cond:
        raise Wrong(msg)


def _canonical_for_oracle(args, kw):
    """The validated problem (oracle side); None if bils itself rejects it (error path)."""
    from bils._validate import problem_iv

    return problem_iv(*args, kw.get("scale"), kw.get("offset"))


def _direct_cost(can, x):
    X = x.reshape(can.n, -1).astype(np.float64)
    S = np.asarray(can.scale, dtype=np.float64)
    O = np.asarray(can.offset, dtype=np.float64)
    Z = S * X + O
    r = can.Y - can.R @ Z
    scale = np.sum((np.abs(can.Y) + np.abs(can.R) @ np.abs(Z)) ** 2, axis=0)
    return np.sum(r * r, axis=0), scale


def _tol(cost, abs_err):
    """Tolerance on a cost ``|r|^2`` whose residual ``r`` has absolute error ``abs_err``."""
    return 2.0 * np.sqrt(np.abs(cost)) * abs_err + abs_err * abs_err + 1e-12


def _abs_err(scale, n, eps=2.2e-16):
    """Rounding error of a residual whose terms sum to ``sqrt(scale)`` in magnitude."""
    return 64.0 * (n + 1) * eps * np.sqrt(scale)


def _problem_abs_err(p, x):
    """:func:`_abs_err` for a BILSProblem (any ordering) and codes ``x`` (original order)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    z = float(np.max(np.abs(p.scale))) * float(np.max(x, initial=0.0)) + float(np.max(np.abs(p.offset)))
    mag = np.sqrt(np.sum(np.asarray(p.Y) ** 2, axis=0)) + np.linalg.norm(p.R) * z * np.sqrt(p.n)
    return _abs_err(mag ** 2, p.n) + 1e-9 * np.sqrt(p.cost_offset)


def _brute_force(can):
    """Minimum cost over the whole box per RHS (None when the box is too large)."""
    n, k = can.Y.shape
    if n > 24:  # meshgrid's dimension limit; such boxes only pass the size test when degenerate
        return None
    out = np.empty(k)
    for j in range(k):
        lo, hi = can.lo[:, j], can.hi[:, j]
        sizes = hi - lo + 1
        if np.prod(sizes.astype(float)) > 4096:
            return None
        grids = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
        P = np.stack([g.ravel() for g in grids]).astype(np.float64)  # (n, m)
        Z = can.scale[:, j][:, None] * P + can.offset[:, j][:, None]
        r = can.Y[:, j][:, None] - can.R @ Z
        out[j] = np.min(np.sum(r * r, axis=0))
    return out


def _check_result(name, res, can, opts, babai_cost=None):
    x = np.asarray(res.x).reshape(can.n, -1)
    cost = np.asarray(res.cost, dtype=np.float64).reshape(-1)
    _check(x.dtype.kind in "iu", f"{name}: codes dtype {x.dtype}")
    _check(np.all(np.isfinite(cost)), f"{name}: non-finite cost {cost}")
    _check(np.all((x >= can.lo) & (x <= can.hi)), f"{name}: code outside the box")
    direct, scale = _direct_cost(can, x)
    eps = 1.2e-7 if opts.get("precision") == "float32" else 2.2e-16
    tol = _tol(np.maximum(direct, cost), _abs_err(scale, can.n, eps))
    _check(np.all(np.abs(direct - cost) <= tol), f"{name}: cost {cost} != identity {direct}")
    if name == "enumerate":
        bf = _brute_force(can)
        status = np.asarray(res.status).reshape(-1)
        if bf is not None:
            opt = status == 0
            _check(np.all(cost[opt] <= bf[opt] + tol[opt]), f"enumerate: OPTIMAL cost {cost} > brute force {bf}")
            _check(np.all(cost >= bf - tol), f"enumerate: cost {cost} below brute force {bf}")
    if name in ("kbest", "klein") and babai_cost is not None:
        _check(np.all(cost <= babai_cost + tol), f"{name}: worse than babai ({cost} > {babai_cost})")


def _clear(exc):
    """Whether ``exc`` is a clear error (documented type, message naming the argument)."""
    import numpy.linalg

    if isinstance(exc, numpy.linalg.LinAlgError):
        return False
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    msg = str(exc)
    return "`" in msg or "must" in msg


def _box_points(args):
    """Points of the box per RHS (inf when the bounds are not plain numbers)."""
    try:
        n = np.asarray(args[0]).shape[0]
        lo = np.asarray(args[2], dtype=np.float64)
        hi = np.asarray(args[3], dtype=np.float64)
        return float(np.max(hi - lo + 1)) ** n
    except (TypeError, ValueError, IndexError, OverflowError):
        return np.inf


def _run_solver_case(rng, name):
    import bils

    args, kw = _solver_inputs(rng)
    opts = _solver_options(rng, name)
    if name == "enumerate" and opts["max_nodes"] is None and _box_points(args) > 4096:
        # an unbudgeted exact search may take exponential time by design (it is Ctrl-C
        # interruptible); outside the brute-force range the fuzz always gives a budget
        # (the numpy reference is pure Python: about 10 us a node, so the budget shrinks with k)
        opts["max_nodes"] = max(50, 10**5 // max(1, np.size(args[1]) // max(1, np.shape(args[0])[0])))
    if name == "klein" and isinstance(opts["tau"], float) and np.isfinite(opts["tau"]) and opts["tau"] > 1e3:
        # a huge temperature over a wide box is valid but costs O(window) per level and RHS
        # (refused by klein's own estimate only beyond 1e11 per RHS): keep the case cheap
        if _box_points(args) ** (1.0 / max(1, np.shape(args[0])[0])) * np.size(args[1]) > 1e5:
            opts["tau"] = 1e3
    fn = getattr(bils, name)
    outs = {}
    for backend in ("numpy", "numba"):
        try:
            outs[backend] = ("ok", fn(*args, **kw, **opts, backend=backend))
        except Exception as exc:  # noqa: BLE001 - classification is the point
            outs[backend] = ("exc", exc)
    kinds = {b: o[0] for b, o in outs.items()}
    if kinds["numpy"] != kinds["numba"]:
        o = outs["numpy"] if kinds["numpy"] == "exc" else outs["numba"]
        raise Wrong(f"backends disagree: one returned, the other raised {o[1]!r}")
    if kinds["numpy"] == "exc":
        e1, e2 = outs["numpy"][1], outs["numba"][1]
        if type(e1) is not type(e2):
            raise Wrong(f"error types differ across backends: {e1!r} vs {e2!r}")
        raise e1
    can = _canonical_for_oracle(args, kw)
    costs = {}
    for backend in ("numpy", "numba"):
        res = outs[backend][1]
        babai_cost = None
        if name in ("kbest", "klein"):
            babai_cost = np.asarray(bils.babai(*args, **kw, backend=backend).cost).reshape(-1)
        _check_result(name, res, can, opts, babai_cost)
        costs[backend] = np.asarray(res.cost).reshape(-1)
    _, scale = _direct_cost(can, np.asarray(outs["numpy"][1].x).reshape(can.n, -1))
    eps = 1.2e-7 if opts.get("precision") == "float32" else 2.2e-16
    tol = 2 * _tol(np.maximum(costs["numpy"], costs["numba"]), _abs_err(scale, can.n, eps))
    if name in ("babai", "enumerate", "kbest") or (name == "klein"):
        statuses = [np.asarray(outs[b][1].status).reshape(-1) for b in ("numpy", "numba")]
        if name != "enumerate" or (np.all(statuses[0] == 0) and np.all(statuses[1] == 0)):
            _check(np.all(np.abs(costs["numpy"] - costs["numba"]) <= tol),
                   f"{name}: numpy cost {costs['numpy']} != numba cost {costs['numba']}")
    return "correct"


def _run_problem_case(rng, name):
    import bils
    from bils import BILSProblem

    n = int(rng.integers(1, 5))
    k = int(rng.integers(1, 3))
    ordering = str(rng.choice(["natural", "reverse", "diag", "sqrd", "vblast", "minpivot", "chang_han"]))
    if rng.random() < 0.05:
        ordering = rng.choice(["act_order", None, 3])
    lo, hi = -3, 3
    if name == "BILSProblem.from_triangular":
        args, kw = _solver_inputs(rng)
        p = BILSProblem.from_triangular(*args, **kw, ordering=ordering)
    elif name == "BILSProblem.from_design":
        m = n + int(rng.integers(0, 4))
        A = rng.standard_normal((m, n)) * (_magnitude(rng) if rng.random() < 0.1 else 1.0)
        if rng.random() < 0.05 and n > 1:
            A[:, 1] = A[:, 0]  # rank deficient
        B = A @ rng.integers(lo, hi + 1, (n, k)) + 0.1 * rng.standard_normal((m, k))
        p = BILSProblem.from_design(_hostile_array(rng, A), _hostile_array(rng, B), _bound(rng, lo),
                                    _bound(rng, hi), ordering=ordering)
    elif name == "BILSProblem.from_gram":
        X = rng.standard_normal((n, 2 * n + 1))
        H = X @ X.T
        if rng.random() < 0.1:
            H[0, :] = H[:, 0] = 0.0  # a dead coordinate
        if rng.random() < 0.1 and n > 1:
            H[0, 1] += 1.0  # not symmetric
        if rng.random() < 0.1:
            H = -H
        T = rng.standard_normal((n, k))
        damp = _option(rng, float(rng.choice([0.0, 0.01, 0.1])), [-1.0, np.nan, 1e300])
        p = BILSProblem.from_gram(_hostile_array(rng, H), _hostile_array(rng, T), _bound(rng, lo),
                                  _bound(rng, hi), damp=damp, ordering=ordering)
    elif name == "BILSProblem.fields":
        base = BILSProblem.from_triangular(_triangular(rng, n), rng.standard_normal((n, k)), lo, hi)
        field = str(rng.choice(["perm", "cost_offset", "R", "Y", "lo", "scale", "dead", "squeeze"]))
        bad = {
            "perm": [np.zeros(n, int), np.arange(n)[::-1].copy(), np.arange(n) + 1, np.arange(n) * 1.0,
                     np.tile(np.arange(n)[:, None], (1, k))],
            "cost_offset": [np.nan, -1.0, np.zeros(k), np.ones(k + 1), 2.0],
            "R": [np.ones((n, n + 1)), np.eye(n + 1), np.triu(np.ones((n, n)))],
            "Y": [np.ones((n + 1, k)), np.ones(n), np.ones((n, k))],
            "lo": [np.zeros((n + 1, 1), int), np.zeros((1, 1), int), np.zeros(n)],
            "scale": [np.ones((1, k)), np.ones((n, k + 1)), np.ones(3)],
            "dead": [np.zeros(n, bool), np.zeros(n + 1, bool), np.zeros(n)],
            "squeeze": [True, False, "yes"],
        }[field]
        p = dataclasses.replace(base, **{field: bad[int(rng.integers(0, len(bad)))]})
    else:  # BILSProblem.cost
        p = BILSProblem.from_triangular(_triangular(rng, n), rng.standard_normal((n, k)), lo, hi,
                                        ordering=str(rng.choice(["natural", "sqrd", "chang_han"])))
        x = rng.integers(lo, hi + 1, (n, k))
        xs = x if rng.random() < 0.8 else _hostile_array(rng, x)
        c = p.cost(xs)
        res = bils.babai(p)
        tol = 2 * _tol(res.cost, _problem_abs_err(p, np.asarray(res.x).reshape(p.n, -1)))
        _check(np.all(np.abs(p.cost(res.x) - res.cost) <= tol), "problem.cost != babai cost")
        _check(c.shape == (k,) and np.all(np.isfinite(c)), f"problem.cost gave {c}")
        return "correct"
    # a built problem must solve to a consistent result
    res = bils.babai(p, backend="numpy")
    _check(np.all(np.isfinite(res.cost)), f"{name}: non-finite cost")
    x2 = np.asarray(res.x).reshape(p.n, -1)
    tol = 2 * _tol(res.cost, _problem_abs_err(p, x2))
    _check(np.all(np.abs(p.cost(res.x) - res.cost) <= tol),
           f"{name}: problem.cost(x) {p.cost(res.x)} != result cost {res.cost}")
    res2 = bils.enumerate(p, max_nodes=10**5, backend="numba")
    _check(np.all(np.asarray(res2.cost) <= np.asarray(res.cost) + tol),
           f"{name}: enumerate worse than babai")
    return "correct"


def _run_other_case(rng, name):
    import bils
    from bils import lattice
    from bils.targets import JointStats, alpha_closed_form, joint_target

    n = int(rng.integers(1, 5))
    if name == "column_order":
        X = rng.standard_normal((n, 2 * n + 1))
        G = X @ X.T
        u = rng.random()
        if u < 0.1 and n > 1:
            G[0, 1] += 0.5
        elif u < 0.2:
            G = -G
        elif u < 0.25:
            G = G.astype(np.complex128)
        method = _option(rng, str(rng.choice(["natural", "reverse", "diag", "sqrd", "vblast", "minpivot"])),
                         ["act_order", None])
        perm = bils.column_order(_hostile_array(rng, G), method)
        _check(sorted(np.asarray(perm).tolist()) == list(range(n)), f"column_order: {perm} not a permutation")
        _check(np.all(np.linalg.eigvalsh(np.asarray(G, dtype=float)) > 0), "column_order accepted a non-PD G")
        return "correct"
    m = int(rng.integers(1, 4))
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((n, 3 * n + 2))
    Xq = X + 0.1 * rng.standard_normal(X.shape)
    H = Xq @ Xq.T + 0.1 * np.eye(n)
    D = (X - Xq) @ Xq.T
    if rng.random() < 0.1 and n > 1:
        H[0, 1] += 1.0
    if rng.random() < 0.05:
        D = D * 1e300
    if name == "joint_target":
        alpha = _option(rng, float(rng.uniform(0, 1)), [-0.5, 1.5, np.nan, "a"])
        Wh, Hh, Dh = _hostile_array(rng, W), _hostile_array(rng, H), _hostile_array(rng, D)
        Wa = joint_target(Wh, Hh, Dh, alpha)
        _check(np.all(np.isfinite(Wa)), "joint_target: non-finite")
        Wh, Hh, Dh = (np.asarray(a, dtype=np.float64) for a in (Wh, Hh, Dh))
        ref = Wh + alpha * Wh @ Dh @ np.linalg.inv(Hh)
        mag = np.abs(Wh) + alpha * np.abs(Wh) @ np.abs(Dh) @ np.abs(np.linalg.inv(Hh))
        _check(np.all(np.abs(Wa - ref) <= 1e-8 * np.linalg.cond(Hh) * mag + 1e-12),
               "joint_target != W + a W D H^-1")
        return "correct"
    if name == "alpha_closed_form":
        Q = W + rng.standard_normal(W.shape) * rng.choice([0.01, 1.0, 100.0])
        a = alpha_closed_form(_hostile_array(rng, Q), _hostile_array(rng, W), _hostile_array(rng, H),
                              _hostile_array(rng, D))
        _check(isinstance(a, float) and 0.0 <= a <= 1.0, f"alpha_closed_form returned {a}")
        return "correct"
    if name == "JointStats.add":
        st = JointStats(n, alpha=_option(rng, None, [0.5, "sample"]), rng=0)
        st.add(X, Xq)
        H0 = st.H.copy()
        Xb, Xqb = _hostile_array(rng, X), _hostile_array(rng, Xq)
        try:
            st.add(Xb, Xqb)
        except Exception:
            _check(np.array_equal(st.H, H0), "JointStats.add changed state before raising")
            raise
        _check(np.all(np.isfinite(st.H)) and np.all(np.isfinite(st.D)), "JointStats: non-finite H/D")
        return "correct"
    # lattice
    d = int(rng.choice([1, 2, 4]))
    bits = int(_option(rng, int(rng.integers(1, 4)), [0, -1, 40, 2.5]))
    G = np.eye(d) + 0.3 * np.triu(rng.standard_normal((d, d)), 1)
    if rng.random() < 0.05:
        G = np.zeros((d, d))
    G = G * (_magnitude(rng) if rng.random() < 0.1 else 1.0)
    cb = bils.Codebook(_hostile_array(rng, G), bits)
    V = rng.standard_normal((d * int(rng.integers(1, 3)), int(rng.integers(1, 4))))
    if name == "lattice.decode":
        Z = rng.integers(cb.lo[0], cb.hi[0] + 1, size=V.shape)
        Zs = Z if rng.random() < 0.8 else _hostile_array(rng, Z + (rng.random() < 0.5) * 100)
        out = lattice.decode(cb, Zs)
        _check(np.all(np.isfinite(out)), "decode: non-finite")
        ref = np.kron(np.eye(V.shape[0] // d), cb.G) @ (np.asarray(Zs, dtype=float) + cb.offset[0])
        _check(np.allclose(out, ref), "decode != (I kron G)(z + o)")
        return "correct"
    if name == "lattice.encode":
        method = _option(rng, str(rng.choice(["round_off", "nearest_plane", "kbest", "exact"])), ["magic"])
        Vh = _hostile_array(rng, V)
        res = lattice.encode(cb, Vh, method=method, backend=str(rng.choice(["numpy", "numba"])))
        Vf = np.asarray(Vh, dtype=np.float64)
        Vf = Vf.reshape(Vf.shape[0], -1)
        Z = np.asarray(res.x).reshape(Vf.shape)
        _check(np.all((Z >= cb.lo[0]) & (Z <= cb.hi[0])), "encode: code outside the box")
        _check(np.all(np.isfinite(res.cost)), "encode: non-finite cost")
        if not cb.companded:
            r = Vf - lattice.decode(cb, Z)
            _check(np.allclose(np.sum(r * r, axis=0), np.asarray(res.cost).reshape(-1), rtol=1e-7, atol=1e-9),
                   "encode: cost != |v - decode(z)|^2")
        return "correct"
    fit = lattice.fit_generator(_hostile_array(rng, np.tile(V, (1, 4))), bits, d=d, n_iter=2,
                                backend="numpy")
    _check(np.all(np.isfinite(fit.codebook.G)), "fit_generator: non-finite G")
    return "correct"


# ---------------------------------------------------------------------------- loaders
def _random_layer(rng):
    from llm_adapter import QuantizedLayer

    out, inp = int(rng.integers(1, 6)), 8 * int(rng.integers(1, 5))
    bits = int(rng.choice([2, 3, 4, 8]))
    gs = int(rng.choice([8, inp]))
    ng = inp // gs
    return QuantizedLayer(codes=rng.integers(0, 2**bits, (out, inp)).astype(np.uint8),
                          scales=rng.uniform(0.01, 1, (out, ng)).astype(np.float32),
                          zeros=rng.integers(0, 2**bits, (out, ng)).astype(np.float32),
                          g_idx=(np.arange(inp) // gs).astype(np.int32), bits=bits, group_size=gs)


def _gptq_layer(rng, out_f, in_f, bits=None, group_size=None):
    """A random layer the GPTQ v1 layout can hold (zero points >= 1), sometimes act-order."""
    from llm_adapter import QuantizedLayer

    bits = int(rng.choice([2, 3, 4, 8])) if bits is None else bits
    group_size = int(rng.choice([32, -1])) if group_size is None else group_size
    gs = in_f if group_size == -1 else group_size
    ng = -(-in_f // gs)
    perm = None
    g_idx = (np.arange(in_f) // gs).astype(np.int32)
    if rng.random() < 0.3:
        perm = rng.permutation(in_f)
        g_idx = np.empty(in_f, np.int32)
        g_idx[perm] = np.arange(in_f) // gs
    return QuantizedLayer(codes=rng.integers(0, 1 << bits, (out_f, in_f)).astype(np.uint8),
                          scales=rng.uniform(1e-3, 0.2, (out_f, ng)).astype(np.float32),
                          zeros=rng.integers(1, 1 << bits, (out_f, ng)).astype(np.float32),
                          g_idx=g_idx, bits=bits, group_size=group_size, perm=perm,
                          bias=rng.standard_normal(out_f).astype(np.float32) if rng.random() < 0.5 else None,
                          stats={"loss": 0.0})


_TINY = {}


def _run_gptq_case(rng, tmp):
    """export_gptq of random layers for the tiny Llama, read back by the test suite's reader."""
    import torch
    from llm_adapter import export_gptq

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from gptq_reader import read_gptq
    from llm_fixtures import tiny_llama

    if "model" not in _TINY:
        _TINY["model"] = tiny_llama()
    model = _TINY["model"]
    layers = {}
    bits, group_size = int(rng.choice([2, 3, 4, 8])), int(rng.choice([32, -1]))  # one per checkpoint
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name and rng.random() < 0.5:
            layers[name] = _gptq_layer(rng, *mod.weight.shape, bits, group_size)
    if not layers:
        return "correct"
    out = export_gptq(model, layers, os.path.join(tmp, "gptq"))
    _, weights, _ = read_gptq(out)
    for name, layer in layers.items():
        s16 = layer.scales.astype(np.float16).astype(np.float32)
        from llm_adapter import QuantizedLayer

        ref = QuantizedLayer(**{**layer.__dict__, "scales": s16}).dequantize()
        _check(np.array_equal(weights[name], ref), f"GPTQ round trip changed {name}")
    return "correct"


def _checkpoint_io():
    """The per-layer checkpoint writer and reader (names kept through the restructure)."""
    try:
        from llm_adapter.calibration.checkpoints import load_layer, save_layer
    except ImportError:
        from llm_adapter.calibrate import load_layer, save_layer
    return save_layer, load_layer


def _same_layers(a, b):
    if set(a) != set(b):
        return False
    for name in a:
        la, lb = a[name], b[name]
        for f in ("codes", "scales", "zeros", "g_idx"):
            if not np.array_equal(np.asarray(getattr(la, f)), np.asarray(getattr(lb, f))):
                return False
        if la.bits != lb.bits or la.group_size != lb.group_size:
            return False
    return True


def _run_loader_case(rng, name):
    from llm_adapter import load_quantized, save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        if name == "export_gptq.roundtrip":
            return _run_gptq_case(rng, tmp)
        if name.startswith("checkpoint."):
            save_layer, load_layer = _checkpoint_io()
            layer = _gptq_layer(rng, int(rng.integers(1, 9)), 32 * int(rng.integers(1, 4)))
            path = os.path.join(tmp, "model.layers.0.mlp.up_proj.npz")
            save_layer(path, layer)
            if name == "checkpoint.roundtrip":
                _check(_same_layers({"l": layer}, {"l": load_layer(path)}), "checkpoint round trip")
                return "correct"
            data = bytearray(open(path, "rb").read())
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= int(rng.integers(1, 256))
            open(path, "wb").write(bytes(data))
            try:
                got = load_layer(path)
            except Exception as exc:  # noqa: BLE001
                if isinstance(exc, (ValueError, OSError)) and os.path.basename(path) in str(exc):
                    raise ClearError(f"{type(exc).__name__}: {exc}") from exc
                raise RuntimeError(f"unclear error {type(exc).__name__}: {exc}") from exc
            if _same_layers({"l": layer}, {"l": got}):
                return "correct"
            raise Wrong(f"byte flip at {pos} of a checkpoint layer loaded silently as different data")
        layers = {f"model.layers.{i}.mlp.up_proj": _random_layer(rng) for i in range(int(rng.integers(1, 3)))}
        path = save_quantized(os.path.join(tmp, "q"), layers)
        if name == "load_quantized.roundtrip":
            got, _ = load_quantized(path)
            _check(_same_layers(layers, got), "round trip changed the layers")
            return "correct"
        files = sorted(os.listdir(path))
        target = [f for f in files if f.endswith(".safetensors" if name.endswith("tensor") else ".json")][0]
        fpath = os.path.join(path, target)
        data = bytearray(open(fpath, "rb").read())
        if name.endswith("tensor"):  # a byte of the tensor data (after the safetensors header)
            hlen = int.from_bytes(data[:8], "little")
            lo = 8 + hlen
        else:
            lo = 0
        if lo >= len(data):
            return "correct"
        pos = int(rng.integers(lo, len(data)))
        data[pos] ^= int(rng.integers(1, 256))
        open(fpath, "wb").write(bytes(data))
        try:
            got, _ = load_quantized(path)
        except Exception as exc:  # noqa: BLE001
            from llm_adapter.formats import QuantizedFormatError

            if isinstance(exc, QuantizedFormatError) or (
                    isinstance(exc, (ValueError, OSError)) and (target in str(exc) or str(path) in str(exc))):
                raise ClearError(f"{type(exc).__name__}: {exc}") from exc
            raise RuntimeError(f"unclear error {type(exc).__name__}: {exc}") from exc
        if _same_layers(layers, got):
            return "correct"  # the flip did not change any value (e.g. JSON whitespace)
        raise Wrong(f"byte flip at {pos} of {target} loaded silently as different weights")


# ---------------------------------------------------------------------------- one case
#: Loader entry points that already pass (the test-suite slice runs them; byte flips wait
#: for checksums in the formats).
LOADERS_PASSING = ("load_quantized.roundtrip", "export_gptq.roundtrip", "checkpoint.roundtrip")


def entries_for(part):
    return {"bils": BILS_ENTRIES, "loaders": LOADER_ENTRIES, "loaders-passing": LOADERS_PASSING,
            "all": BILS_ENTRIES + LOADER_ENTRIES}[part]


def case_entry(seed, part):
    entries = entries_for(part)
    return entries[seed % len(entries)]


def run_case(seed, part):
    """Run case ``seed``; returns (entry, outcome, detail)."""
    import warnings

    entry = case_entry(seed, part)
    rng = np.random.default_rng([seed, 17])
    _MODE["hostile"] = bool(rng.random() < 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                if entry in SOLVER_ENTRIES:
                    outcome = _run_solver_case(rng, entry)
                elif entry in PROBLEM_ENTRIES:
                    outcome = _run_problem_case(rng, entry)
                elif entry in OTHER_ENTRIES:
                    outcome = _run_other_case(rng, entry)
                else:
                    outcome = _run_loader_case(rng, entry)
        return entry, outcome, ""
    except Wrong as exc:
        return entry, "wrong", str(exc)[:300]
    except ClearError as exc:
        return entry, "error", str(exc)[:200]
    except Exception as exc:  # noqa: BLE001
        if _clear(exc):
            return entry, "error", f"{type(exc).__name__}: {str(exc)[:160]}"
        tb = traceback.format_exc(limit=3)
        return entry, "crash", f"{type(exc).__name__}: {str(exc)[:200]} | {tb[-400:]}"


# ---------------------------------------------------------------------------- workers
def _worker(conn, part):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    while True:
        seed = conn.recv()
        if seed is None:
            return
        conn.send(run_case(seed, part))


class _Pool:
    """Worker processes with a per-case timeout: a hung worker is killed and replaced."""

    def __init__(self, workers, part, timeout):
        self.ctx = mp.get_context("spawn")
        self.part, self.timeout = part, timeout
        self.slots = [self._start() for _ in range(workers)]

    def _start(self):
        a, b = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(b, self.part), daemon=True)
        p.start()
        return {"proc": p, "conn": a, "seed": None, "t0": 0.0}

    def run(self, seeds, on_result):
        todo = list(seeds)[::-1]
        busy = 0
        while todo or busy:
            for i, s in enumerate(self.slots):
                if s["seed"] is None and todo:
                    s["seed"] = todo.pop()
                    s["t0"] = time.monotonic()
                    s["first"] = s.get("first", True)
                    s["conn"].send(s["seed"])
                    busy += 1
            conns = [s["conn"] for s in self.slots if s["seed"] is not None]
            mp.connection.wait(conns, timeout=0.5)
            for i, s in enumerate(self.slots):
                if s["seed"] is None:
                    continue
                seed = s["seed"]
                limit = self.timeout * (6 if s["first"] else 1)  # imports + JIT cache on first case
                try:
                    if s["conn"].poll():
                        on_result(seed, *s["conn"].recv())
                        s["seed"] = None
                        s["first"] = False
                        busy -= 1
                        continue
                except (EOFError, OSError):
                    on_result(seed, case_entry(seed, self.part), "crash", "worker process died")
                    self._replace(i)
                    busy -= 1
                    continue
                if not s["proc"].is_alive():
                    on_result(seed, case_entry(seed, self.part), "crash",
                              f"worker process died (exit code {s['proc'].exitcode})")
                    self._replace(i)
                    busy -= 1
                elif time.monotonic() - s["t0"] > limit:
                    on_result(seed, case_entry(seed, self.part), "hang", f"no answer in {limit:.0f} s")
                    self._replace(i)
                    busy -= 1

    def _replace(self, i):
        s = self.slots[i]
        if s["proc"].is_alive():
            s["proc"].kill()
        s["proc"].join(5)
        self.slots[i] = self._start()

    def close(self):
        for s in self.slots:
            try:
                s["conn"].send(None)
            except (OSError, BrokenPipeError):
                pass
            s["proc"].join(5)
            if s["proc"].is_alive():
                s["proc"].kill()


def fuzz(cases, *, part="bils", workers=1, timeout=20.0, start=0, progress=False):
    """Run ``cases`` cases (seeds ``start .. start + cases - 1``); returns the summary dict."""
    counts = defaultdict(Counter)
    bad = []
    t0 = time.perf_counter()
    done = [0]

    def on_result(seed, entry, outcome, detail):
        counts[entry][outcome] += 1
        if outcome in ("wrong", "crash", "hang"):
            bad.append({"seed": seed, "entry": entry, "outcome": outcome, "detail": detail})
        done[0] += 1
        if progress and done[0] % 500 == 0:
            print(f"{done[0]} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    pool = _Pool(workers, part, timeout)
    try:
        pool.run(range(start, start + cases), on_result)
    finally:
        pool.close()
    totals = Counter()
    for c in counts.values():
        totals.update(c)
    return {
        "part": part,
        "cases": cases,
        "seconds": round(time.perf_counter() - t0, 1),
        "totals": {o: totals.get(o, 0) for o in OUTCOMES},
        "per_entry": {e: {o: counts[e].get(o, 0) for o in OUTCOMES} for e in sorted(counts)},
        "failures": bad[:200],
        "n_failures": len(bad),
    }


def _table(summary):
    lines = [f"{'entry point':34s} " + " ".join(f"{o:>8s}" for o in OUTCOMES)]
    for e, c in summary["per_entry"].items():
        lines.append(f"{e:34s} " + " ".join(f"{c[o]:8d}" for o in OUTCOMES))
    t = summary["totals"]
    lines.append(f"{'total':34s} " + " ".join(f"{t[o]:8d}" for o in OUTCOMES))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--part", choices=("bils", "loaders", "loaders-passing", "all"), default="all",
                    help="'all' runs --cases bils cases and --cases/10 loader cases")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--replay", type=int, default=None, help="run one seed in-process and print it")
    ap.add_argument("--out", default="fuzz.json")
    args = ap.parse_args(argv)
    if args.replay is not None:
        part = "bils" if args.part == "all" else args.part
        print(run_case(args.replay, part))
        return 0
    from _common import machine_info, write_json

    parts = ("bils", "loaders") if args.part == "all" else (args.part,)
    report = {"machine": machine_info(), "timeout_s": args.timeout}
    for part in parts:
        n = max(1, args.cases // 10) if (args.part == "all" and part == "loaders") else args.cases
        timeout = args.timeout if part == "bils" else max(args.timeout, 60.0)  # torch imports
        summary = fuzz(n, part=part, workers=args.workers, timeout=timeout, start=args.start,
                       progress=True)
        report[part] = summary
        print(f"\n[{part}] {n} cases in {summary['seconds']} s")
        print(_table(summary))
    path = write_json(args.out, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

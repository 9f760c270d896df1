r"""The encoders of :mod:`bils.lattice` on the ``cupy`` backend.

Encoding ``V`` (n, N) under the metric :math:`M = C^T C` is the BILS
:math:`\min \lVert Q^T C v - R (z + o) \rVert^2` with :math:`C (I_m \otimes G) = Q R`
(one QR per diagonal d x d block). ``R`` and the block ``Q`` depend only on the codebook
and the metric (host inputs), so they are formed on the host as in
:func:`bils.lattice.encode._build` and copied to the device once; ``V`` never leaves the
device: companding, :math:`Y = Q^T C V`, the solvers (``backend="cupy"`` kernels) and
the costs run in the device namespace. Validation of ``V`` runs there too (only the
outcome of each check crosses to the host) with the CPU's messages. A numpy ``V`` gets
numpy results (copied back), a device ``V`` device results.
"""

from __future__ import annotations

import math

import numpy as np

from ..result import BILSResult, Status, _to_host
from .._backend import array_namespace
from .._validate import _real_array, choice_iv, int_iv
from ._common import to_device, xp_module

__all__ = ["encode", "encode_factor"]


def _vectors_iv(name, V, d, xp):
    """:func:`bils.lattice.codebook.check_vectors` in the namespace ``xp``."""
    V = _real_array(name, V, xp=xp)
    if V.ndim not in (1, 2):
        raise ValueError(f"`{name}` must be 1-D (n,) or 2-D (n, N), got {V.ndim}-D")
    squeeze = V.ndim == 1
    V = xp.asarray(V, dtype=np.float64).reshape(V.shape[0], -1)
    n, N = V.shape
    if n == 0 or n % d:
        raise ValueError(f"`{name}` must have a positive multiple of d = {d} rows, got {n}")
    if N == 0:
        raise ValueError(f"`{name}` must have at least one column")
    if not bool(xp.all(xp.isfinite(V))):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")
    return V, squeeze


def _basis(codebook, C):
    """Host ``R`` (n, n) and the block-diagonal ``Q^T C`` (n, n) of the encoding."""
    d = codebook.d
    n = C.shape[0]
    m = n // d
    B = np.zeros((n, n))
    for s in range(m):
        sl = slice(s * d, (s + 1) * d)
        B[:, sl] = C[:, sl] @ codebook.G
    R = np.zeros((n, n))
    QtC = np.zeros((n, n))
    for s in range(m):
        sl = slice(s * d, (s + 1) * d)
        Q, Rs = np.linalg.qr(B[sl, sl])
        sign = np.where(np.diag(Rs) < 0, -1.0, 1.0)
        Q = Q * sign
        R[sl, sl] = np.triu(sign[:, None] * Rs)
        R[sl, (s + 1) * d:] = Q.T @ B[sl, (s + 1) * d:]
        QtC[sl] = Q.T @ C[sl]
    return R, QtC


def encode(codebook, V, metric=None, *, method="nearest_plane", beam_width=8, max_nodes=None):
    """:func:`bils.lattice.encode` with ``backend="cupy"`` (arguments validated alike)."""
    from ..lattice.codebook import check_codebook, metric_factor
    from ..lattice.encode import ENCODE_METHODS

    xp = xp_module()
    on_host = array_namespace(V) is np  # numpy in, numpy out (copied back)
    codebook = check_codebook(codebook)
    V, squeeze = _vectors_iv("V", V, codebook.d, xp)
    method = choice_iv("method", method, ENCODE_METHODS)
    beam_width = int_iv("beam_width", beam_width, minimum=1)
    max_nodes = int_iv("max_nodes", max_nodes, minimum=1, allow_none=True)
    C = metric_factor(metric, V.shape[0])
    if codebook.companded:  # compand (bils.lattice.compand) on the device
        mu, amax = codebook.mu, codebook.amax
        V = amax * xp.sign(V) * xp.log1p(mu * xp.abs(V) / amax) / math.log1p(mu)
    return encode_factor(codebook, V, C, method, beam_width, max_nodes, squeeze, host=on_host)


def encode_factor(codebook, V, C, method, beam_width, max_nodes, squeeze=False, *, host=False):
    """:func:`bils.lattice.encode.encode_prepared` on the device: validated (and companded) ``V`` (n, N),
    metric factor ``C`` (host). With ``host=True`` the result's arrays are copied back to
    the host (for :func:`bils.lattice.fit_generator`, whose fitting runs in numpy)."""
    from ..babai import babai
    from ..enumeration import enumerate as bils_enumerate
    from ..kbest import kbest

    xp = xp_module()
    V = to_device(V, np.float64)
    n, N = V.shape
    d = codebook.d
    Rh, QtC = _basis(codebook, C)
    R = to_device(Rh)
    Y = to_device(to_device(QtC) @ V)
    lo = to_device(np.tile(codebook.lo, n // d)[:, None].astype(np.int64))
    hi = to_device(np.tile(codebook.hi, n // d)[:, None].astype(np.int64))
    off = to_device(np.tile(codebook.offset, n // d)[:, None].astype(np.float64))
    info = {}
    if method == "round_off":  # per sub-vector clip(round(R_ss^{-1} t - o)), last first
        Z = xp.empty((n, N), dtype=np.int64)
        Zo = xp.zeros((n, N))
        for a in range(n - d, -1, -d):
            sl = slice(a, a + d)
            t = Y[sl] - R[sl, a + d:] @ Zo[a + d:]
            u = to_device(np.linalg.inv(Rh[sl, sl])) @ t - off[sl]
            z = xp.clip(xp.floor(u + 0.5), lo[sl], hi[sl])
            Z[sl] = z.astype(np.int64)
            Zo[sl] = z + off[sl]
        status = xp.full(N, int(Status.HEURISTIC), dtype=np.int8)
    elif method == "exact":  # exact search per sub-vector, decided last to first
        Z = xp.empty((n, N), dtype=np.int64)
        Zo = xp.zeros((n, N))
        status = xp.full(N, int(Status.OPTIMAL if n == d else Status.HEURISTIC), dtype=np.int8)
        nodes = xp.zeros(N, dtype=np.int64)
        for a in range(n - d, -1, -d):
            sl = slice(a, a + d)
            t = Y[sl] - R[sl, a + d:] @ Zo[a + d:]
            res = bils_enumerate(R[sl, sl], t, lo[sl], hi[sl], offset=off[sl],
                                 max_nodes=max_nodes, backend="cupy")
            Z[sl] = res.x
            Zo[sl] = res.x + off[sl]
            nodes += res.info["nodes"]
            status[res.status == Status.BUDGET_EXHAUSTED] = int(Status.BUDGET_EXHAUSTED)
        info = {"nodes": nodes}
    else:
        if method == "nearest_plane":
            res = babai(R, Y, lo, hi, offset=off, backend="cupy")
        else:
            res = kbest(R, Y, lo, hi, offset=off, beam_width=beam_width, backend="cupy")
            info = {"beam_width": beam_width}
        Z, status = res.x, res.status
    if method in ("round_off", "exact"):
        r = Y - R @ (Z + off)
        cost = xp.sum(r * r, axis=0)
    else:
        cost = res.cost
    if squeeze:
        Z, cost, status = Z[:, 0], cost[0], status[0]
    if host:
        h = lambda a: np.asarray(_to_host(a))  # noqa: E731
        Z, cost, status = h(Z), h(cost), h(status)
        info = {k: h(v) for k, v in info.items()}
    return BILSResult(x=Z, cost=xp.asarray(cost), status=xp.asarray(status), backend="cupy",
                      solver=f"lattice/{method}", info=info)

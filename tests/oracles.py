r"""Slow, obviously correct oracles for the test-suite.

Brute force, the textbook Babai loop and the exact solver with a certificate are public
API in :mod:`bils.testing.oracles` (import them from there). The GPTQ reference loop is
test-only: :func:`gptq_fasterquant_reference` is a plain float64 numpy transcription of
GPTQ's published ``GPTQ.fasterquant`` and ``Quantizer`` (Frantar et al. 2023,
github.com/IST-DASLab/gptq, ``gptq.py`` and ``quant.py``), kept deliberately close to the
original line by line.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Quantizer", "gptq_fasterquant_reference", "quantize_codes"]


class Quantizer:
    """GPTQ's ``Quantizer`` (``quant.py``) for weights, per channel, min-max (no MSE search)."""

    def __init__(self, bits, sym=False):
        self.maxq = 2**bits - 1
        self.sym = sym
        self.scale = None
        self.zero = None

    def find_params(self, x):
        """``x`` (rows, cols): one (scale, zero) per row, from min(x, 0) and max(x, 0)."""
        xmin = np.minimum(x.min(axis=1), 0.0)
        xmax = np.maximum(x.max(axis=1), 0.0)
        if self.sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            tmp = xmin < 0
            if np.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = np.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = np.round(-xmin / self.scale)  # torch.round: half to even, as np.round
        self.scale = self.scale.reshape(-1, 1)
        self.zero = self.zero.reshape(-1, 1)

    def copy(self):
        q = Quantizer.__new__(Quantizer)
        q.__dict__.update(self.__dict__)
        return q


def quantize_codes(x, scale, zero, maxq):
    """``quant.quantize`` split in two: the integer code ``q`` (and ``scale * (q - zero)``)."""
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def gptq_fasterquant_reference(W, H, *, bits, group_size=None, act_order=False,
                               static_groups=False, blocksize=128, percdamp=0.01, sym=False):
    """GPTQ's ``fasterquant`` in float64 numpy.

    Parameters
    ----------
    W : (m, n) array
        Layer weights (rows = output channels).
    H : (n, n) array
        Input Gram matrix (GPTQ's ``self.H``).
    bits, group_size, act_order, static_groups, blocksize, percdamp, sym
        As in GPTQ (``groupsize=-1`` is ``group_size=None``).

    Returns
    -------
    codes : (m, n) int64
        Integer codes ``q`` in the original column order.
    scale, zero : (m, n) float64
        The grid each weight was quantized on (original column order), so the run can be
        replayed with fixed grids.
    Q : (m, n) float64
        Dequantized weights ``scale * (q - zero)`` (GPTQ's return value).

    Notes
    -----
    Faithful to the original, including its quirks: the per-channel grid is found on
    ``W`` before dead columns are zeroed; with ``static_groups`` the group grids come
    from the original ``W`` (after zeroing); without them the grid of the group starting
    at column ``i`` is found when the loop reaches it, on the *block-level* ``W`` (updated
    only at block boundaries, not within the current block). The act-order permutation
    is a stable argsort (torch's is unstable, which only matters for equal diagonals).
    """
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    m, columns = W.shape
    groupsize = -1 if group_size is None else int(group_size)
    quantizer = Quantizer(bits, sym=sym)
    quantizer.find_params(W)

    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            q = quantizer.copy()
            q.find_params(W[:, i:(i + groupsize)])
            groups.append(q)

    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = np.argsort(perm)

    Q = np.zeros_like(W)
    codes = np.zeros_like(W)
    S_used = np.zeros_like(W)
    Z_used = np.zeros_like(W)

    damp = percdamp * np.mean(np.diag(H))
    diag = np.arange(columns)
    H[diag, diag] += damp
    L = np.linalg.cholesky(H)
    Hinv_full = np.linalg.inv(L).T @ np.linalg.inv(L)  # torch.cholesky_inverse
    Hinv = np.linalg.cholesky(Hinv_full).T  # torch.linalg.cholesky(upper=True)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if act_order:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]

            q, qd = quantize_codes(w[:, None], quantizer.scale, quantizer.zero, quantizer.maxq)
            Q1[:, i] = qd[:, 0]
            codes[:, i1 + i] = q[:, 0]
            S_used[:, i1 + i] = quantizer.scale[:, 0]
            Z_used[:, i1 + i] = quantizer.zero[:, 0]

            err1 = (w - qd[:, 0]) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        Q, codes = Q[:, invperm], codes[:, invperm]
        S_used, Z_used = S_used[:, invperm], Z_used[:, invperm]
    return codes.astype(np.int64), S_used, Z_used, Q

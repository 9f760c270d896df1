"""Torch-CPU re-implementations of GPTQ's published loop (the baseline users run today).

* :func:`gptq_original` follows ``fasterquant`` of the reference implementation
  (IST-DASLab/gptq, ``gptq.py``; Frantar et al., ICLR 2023) line by line for the case
  ``groupsize=g, actorder=True, static_groups=True, blocksize=128, percdamp=0.01``,
  including its ``Quantizer`` objects (min-max asymmetric, ``find_params``) deep-copied
  per group and the per-column quantizer look-up through ``perm``.
* :func:`gptq_lean` is the same algorithm written tightly: the grid (scale, zero per
  column, act-order permuted) is precomputed, the inner loop is a handful of tensor ops.

Both work in ``dtype`` (GPTQ uses float32) and return the integer codes ``q`` (out, in)
in the original column order, so they can be compared code-for-code with
``bils.babai`` on ``BILSProblem.from_gram(H, W.T, 0, maxq, ..., ordering="diag")``.
"""

from __future__ import annotations

import copy
import math

import torch


class Quantizer:
    """GPTQ's ``Quantizer`` for ``perchannel=True, sym=False, mse=False`` weights."""

    def __init__(self, bits):
        self.maxq = torch.tensor(2 ** bits - 1)
        self.scale = None
        self.zero = None

    def find_params(self, x):
        tmp = torch.zeros(x.shape[0], dtype=x.dtype)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        self.zero = torch.round(-xmin / self.scale)
        self.scale = self.scale.reshape(-1, 1)
        self.zero = self.zero.reshape(-1, 1)


def _quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq_original(W, H, *, bits=4, groupsize=128, blocksize=128, percdamp=0.01,
                  dtype=torch.float32):
    """GPTQ ``fasterquant`` (act-order, static groups); returns codes (out, in) int64."""
    W = W.clone().to(dtype)
    H = H.clone().to(dtype)
    columns = W.shape[1]
    quantizer = Quantizer(bits)
    quantizer.find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = []
    for i in range(0, columns, groupsize):
        qz = copy.deepcopy(quantizer)
        qz.find_params(W[:, i:(i + groupsize)])
        groups.append(qz)

    perm = torch.argsort(torch.diag(H), descending=True)
    W = W[:, perm]
    H = H[perm][:, perm]
    invperm = torch.argsort(perm)

    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            quantizer = groups[perm[i1 + i] // groupsize]
            q = _quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    Q = Q[:, invperm]
    # integer codes of the dequantised weights (outside the published loop)
    scale = torch.cat([g.scale.expand(-1, min(groupsize, columns - j * groupsize))
                       for j, g in enumerate(groups)], dim=1)
    zero = torch.cat([g.zero.expand(-1, min(groupsize, columns - j * groupsize))
                      for j, g in enumerate(groups)], dim=1)
    return (torch.round(Q / scale) + zero).to(torch.int64)


def gptq_lean(W, H, scale, zero, *, maxq=15, blocksize=128, percdamp=0.01, dtype=torch.float32):
    """GPTQ with a precomputed grid: ``scale``, ``zero`` (out, in) per weight.

    Same loop as :func:`gptq_original` (act-order, lazy batch of ``blocksize``) with the
    quantizer replaced by one vectorised round/clamp per column. Returns codes (out, in).
    """
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True)
    W = W[:, perm].contiguous()
    S = scale.to(dtype)[:, perm].t().contiguous()  # (in, out): one contiguous row per column
    Zp = zero.to(dtype)[:, perm].t().contiguous()
    H = H[perm][:, perm]
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(columns, W.shape[0], dtype=dtype, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].t().contiguous()  # (count, out): row i is column i1 + i
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[i]
            s = S[i1 + i]
            q = torch.clamp(torch.round(w / s) + Zp[i1 + i], 0, maxq)
            codes[i1 + i] = q
            err = (w - s * (q - Zp[i1 + i])) / Hinv1[i, i]
            W1[i:] -= torch.outer(Hinv1[i, i:], err)
            Err1[i] = err
        W[:, i2:] -= Err1.t().matmul(Hinv[i1:i2, i2:])
    return codes.t()[:, torch.argsort(perm)].to(torch.int64)


def minmax_grid(W, bits, groupsize):
    """GPTQ's static-group min-max grid of ``W`` (out, in): ``scale``, ``zero`` (out, in)."""
    out, cols = W.shape
    maxq = 2 ** bits - 1
    scale = torch.empty_like(W)
    zero = torch.empty_like(W)
    q = Quantizer(bits)
    for g0 in range(0, cols, groupsize):
        g1 = min(cols, g0 + groupsize)
        q.find_params(W[:, g0:g1])
        scale[:, g0:g1] = q.scale
        zero[:, g0:g1] = q.zero
    assert math.isfinite(float(scale.max())) and maxq > 0
    return scale, zero

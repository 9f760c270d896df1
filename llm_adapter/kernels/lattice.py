r"""glvq decode-GEMM: the kernel layout of a lattice layer, and the algorithm in numpy.

For a :class:`~llm_adapter.methods.glvq.LatticeLayer`, sub-vector ``s`` (``d`` columns
from ``s0``) of group ``g`` of row ``j`` decodes to
:math:`\hat W_{j,s} = r_j\, c_s \circ G_g (z_{js} + o)` with :math:`z = q + lo_g` for the
stored code offsets :math:`q \in [0, 2^{b_g})`, :math:`lo_g = -2^{b_g - 1}`. Hence

.. math::

    y_j = \sum_i x_i \hat W_{ji}
        = r_j \Big( \sum_p u_p\, q_{jp} + \sum_p \gamma_{g(p)}\, u_p \Big),
    \qquad u_{s_0+k} = \sum_i (G_g)_{ik}\, c_{s_0+i}\, x_{s_0+i}, \quad \gamma_g = lo_g + o:

decoding :math:`G z` inside the product is done once per *activation* sub-vector
(``in * d`` flops per token), and the weight pass is the uniform GEMV over the packed codes
with one scale per row and no zero point — the memory traffic of a uniform kernel without
per-group scales. Per-group bits (salience allocation) only change :math:`\gamma_g`; the
codes are packed at the common width (:func:`~llm_adapter.formats.packing.pack_width`).
The µ-law compander is not linear, so companded layers are not supported here.
"""

from __future__ import annotations

import numpy as np

from ..formats.packing import pack, pack_width, unpack

__all__ = ["KERNEL_PACK_BITS", "lattice_centres", "lattice_matmul_reference", "pack_lattice_layer"]

#: Packing widths the kernel reads.
KERNEL_PACK_BITS = (2, 3, 4, 8)


def lattice_centres(group_bits, offset: float) -> np.ndarray:
    r""":math:`\gamma_g = -2^{b_g - 1} + o` per group (float32).

    >>> lattice_centres([2, 3], 0.5).tolist()
    [-1.5, -3.5]
    """
    gb = np.asarray(group_bits, dtype=np.int64)
    return (-(2.0 ** (gb - 1)) + float(offset)).astype(np.float32)


def pack_lattice_layer(layer) -> dict:
    """The kernel layout of a :class:`~llm_adapter.methods.glvq.LatticeLayer` (numpy arrays).

    Parameters
    ----------
    layer : LatticeLayer
        Without a µ-law compander.

    Returns
    -------
    dict
        ``qweight_t`` int32 ``(packed_length(in, bits), out)`` (codes packed along the
        input dim, GPTQ orientation: the transpose of ``LatticeLinear.qweight``),
        ``generators`` float16 ``(n_groups, d, d)``, ``centre`` float32 ``(n_groups,)``,
        ``row_scale`` float16 ``(1, out)`` (ones if absent), ``col_scale`` float16
        ``(in,)`` or None, ``bias`` float32 ``(out,)`` or None, and the ints ``bits``
        (packing width), ``d``, ``group_size``, ``in_features``, ``out_features``.

    Raises
    ------
    ValueError
        If the layer has a compander, or its group size is not a multiple of ``d``.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 32)); X = rng.standard_normal((32, 128))
    >>> q = quantize_weight_glvq(W, X @ X.T, spec=GLVQSpec(bits=2, d=4, group_size=16, n_iter=1),
    ...                          backend="numpy")
    >>> p = pack_lattice_layer(q)
    >>> p["qweight_t"].shape, p["centre"].tolist(), p["bits"]
    ((2, 8), [-1.5, -1.5], 2)
    """
    if layer.mu is not None:
        raise ValueError("the kernel does not implement the µ-law compander (a layer with `mu`); use dequantize()")
    if layer.group_size % layer.d:
        raise ValueError(f"`group_size` = {layer.group_size} must be a multiple of `d` = {layer.d}")
    bits = pack_width(int(np.max(layer.group_bits)))
    out, n = layer.codes.shape
    return {
        "qweight_t": pack(np.asarray(layer.codes).T.astype(np.int64), bits, axis=0),
        "generators": np.asarray(layer.generators, dtype=np.float16),
        "centre": lattice_centres(layer.group_bits, layer.offset),
        "row_scale": (np.ones((1, out), np.float16) if layer.row_scale is None
                      else np.asarray(layer.row_scale, dtype=np.float16).reshape(1, out)),
        "col_scale": None if layer.col_scale is None else np.asarray(layer.col_scale, dtype=np.float16),
        "bias": None if layer.bias is None else np.asarray(layer.bias, dtype=np.float32),
        "bits": bits, "d": int(layer.d), "group_size": int(layer.group_size), "in_features": n,
        "out_features": out,
    }


def lattice_matmul_reference(x, packed) -> np.ndarray:
    """``x @ dequantize(W).T + bias`` computed the way the kernel does (numpy, float64).

    Parameters
    ----------
    x : (batch, in) array_like
    packed : dict
        From :func:`pack_lattice_layer`.

    Returns
    -------
    (batch, out) ndarray of float64

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 32)); X = rng.standard_normal((32, 128))
    >>> q = quantize_weight_glvq(W, X @ X.T, spec=GLVQSpec(bits=2, d=4, group_size=16, n_iter=1),
    ...                          backend="numpy")
    >>> x = rng.standard_normal((3, 32))
    >>> bool(np.allclose(lattice_matmul_reference(x, pack_lattice_layer(q)), x @ q.dequantize(np.float64).T))
    True
    """
    x = np.asarray(x, dtype=np.float64)
    bits, d, gs, n = packed["bits"], packed["d"], packed["group_size"], packed["in_features"]
    G = packed["generators"].astype(np.float64)
    xs = x if packed["col_scale"] is None else x * packed["col_scale"].astype(np.float64)
    # step 1 (glvq_transform): u_{s0+k} = sum_i G_g[i, k] (c x)_{s0+i}, and the centre term
    u = np.empty_like(xs)
    for s0 in range(0, n, d):
        u[:, s0:s0 + d] = xs[:, s0:s0 + d] @ G[s0 // gs]
    gamma = packed["centre"].astype(np.float64)[np.arange(n) // gs]
    # step 2 (qmm with one group, scale r, zero 0): codes against u, plus r * centre term
    q = unpack(packed["qweight_t"], bits, n, axis=0).astype(np.float64)  # (in, out)
    r = packed["row_scale"].astype(np.float64).reshape(-1)
    y = (u @ q + (u @ gamma)[:, None]) * r[None, :]
    if packed["bias"] is not None:
        y = y + packed["bias"].astype(np.float64)[None, :]
    return y

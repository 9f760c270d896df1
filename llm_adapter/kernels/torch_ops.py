r"""The kernels as torch custom ops, so :class:`~llm_adapter.nn.QuantLinear` and
:class:`~llm_adapter.nn.LatticeLinear` run on packed weights on a CUDA device, under
``torch.compile`` and CUDA graphs.

* ``llm_adapter::quant_matmul`` (defined with its CPU and fake implementations in
  :mod:`llm_adapter.nn`): the CUDA implementation registered here is
  :func:`llm_adapter.kernels.quant_matmul` for up to :data:`MAX_FUSED_BATCH` rows, and a
  transient dequantize + cuBLAS ``F.linear`` beyond (prefill: the weight is read once per
  GEMM instead of once per 16 rows; nothing is cached). GPTQ act-order weights are
  repacked once (columns sorted by group, cached per weight tensor) so the kernel runs with
  static groups on ``x[:, perm]``.
* ``llm_adapter::lattice_matmul`` (defined here): CPU = decode the weight in torch, then
  ``F.linear``; fake = the output shape; CUDA = :func:`llm_adapter.kernels.lattice_matmul`
  on the kernel layout, derived once per codes tensor (the transpose of
  ``LatticeLinear.qweight``: a few bits per weight, held in a cache keyed by the codes
  tensor; the stored format does not change).

The CUDA implementations launch on torch's current stream (``numba.cuda.external_stream``)
and allocate with torch, so a captured CUDA graph replays them; run the module once before
capturing (the first call compiles the kernels). bfloat16 activations are converted to
float32 at the op boundary (numba-cuda 0.30 has no bfloat16 array type); float16 and
float32 go in as they are. Importing this module does not import numba.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from . import available

__all__ = ["MAX_FUSED_BATCH", "dequantize_lattice_torch", "lattice_linear", "lattice_matmul",
           "lattice_supported", "model_memory"]

logger = logging.getLogger(__name__)

#: Rows per call run by the fused kernels; larger batches dequantize transiently + cuBLAS.
MAX_FUSED_BATCH = 16

_QMM = "llm_adapter::quant_matmul"
_LMM = "llm_adapter::lattice_matmul"


def _kernel_dtype(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.float32):
        return x.contiguous()
    return x.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- quant_matmul (CUDA)


def _quant_matmul_cuda(x, qweight, scales, zeros, g_idx, bias, bits, group_size, in_features):
    from . import quant_matmul as kernel
    from ..nn.linear import dequantize_packed

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] > MAX_FUSED_BATCH:
        w = dequantize_packed(qweight, scales, zeros, g_idx, bits, group_size, in_features, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if g_idx is not None:
        sorted_layout = _act_order_layout(qweight, g_idx, bits, group_size, in_features)
        if sorted_layout is not None:  # static groups on sorted columns, x gathered to match
            qweight, perm = sorted_layout
            x2, g_idx = x2.index_select(1, perm), None
    y = kernel(_kernel_dtype(x2), qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
               None if g_idx is None else g_idx.to(torch.int32).contiguous(), bits, group_size, in_features, bias=b)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


#: Act-order repacking: id(qweight) -> (weakref(qweight), version, weakref(g_idx), g_idx version, layout)
_ACT_ORDER_CACHE: dict = {}


def _act_order_layout(qweight, g_idx, bits, group_size, in_features):
    """``(qweight of the columns sorted by group, perm)`` when sorting the input columns by
    ``g_idx`` (stable) makes the groups the static ``i // group_size`` ones (GPTQ act-order),
    else None (the kernel then looks the group up per value). Computed once per weight (a
    load-time repacking; the stored buffers do not change) and cached; never inside a CUDA
    graph capture (it needs the host), where the per-value path runs instead."""
    hit = _ACT_ORDER_CACHE.get(id(qweight))
    if (hit is not None and hit[0]() is qweight and hit[1] == qweight._version and hit[2]() is g_idx
            and hit[3] == g_idx._version):
        return hit[4]
    if qweight.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    for k in [k for k, v in _ACT_ORDER_CACHE.items() if v[0]() is None]:
        del _ACT_ORDER_CACHE[k]
    layout = None
    if group_size != -1:
        from ..formats.packing import pack
        from ..nn.linear import unpack_torch

        g = g_idx.to(torch.int64)
        perm = torch.sort(g, stable=True).indices
        static = torch.arange(in_features, device=g.device) // group_size
        if torch.equal(g[perm], static):
            codes = unpack_torch(qweight, bits, in_features)[perm]
            packed = torch.from_numpy(pack(codes.cpu().numpy(), bits, axis=0)).to(qweight.device)
            layout = (packed, perm.to(qweight.device))
    _ACT_ORDER_CACHE[id(qweight)] = (weakref.ref(qweight), qweight._version, weakref.ref(g_idx), g_idx._version,
                                     layout)
    return layout


# --------------------------------------------------------------------------- lattice_matmul


def dequantize_lattice_torch(qweight, generators, group_bits, row_scale, col_scale, pack_bits: int, d: int,
                             group_size: int, in_features: int, offset: float) -> torch.Tensor:
    r"""The glvq weight ``(out, in)`` in float32 from ``LatticeLinear``'s buffers (torch).

    :math:`\hat W_{j,s_0+i} = r_j\, c_{s_0+i} \sum_k (G_g)_{ik} (q_{j,s_0+k} + lo_g + o)`,
    :math:`lo_g = -2^{b_g-1}`.
    """
    from ..nn.linear import unpack_torch

    n = int(in_features)
    codes = unpack_torch(qweight.t().contiguous(), pack_bits, n).to(torch.float32)  # (in, out)
    g = torch.arange(n, device=qweight.device) // group_size
    centre = -(2.0 ** (group_bits.to(torch.float32) - 1)) + float(offset)
    z = codes + centre.to(qweight.device)[g][:, None]
    sub = torch.arange(0, n, d, device=qweight.device)
    G = generators.to(torch.float32)[sub // group_size]  # (n/d, d, d)
    wt = torch.einsum("sik,sko->sio", G, z.reshape(n // d, d, -1)).reshape(n, -1)  # (in, out)
    if col_scale is not None:
        wt = wt * col_scale.to(torch.float32)[:, None]
    if row_scale is not None:
        wt = wt * row_scale.to(torch.float32).reshape(1, -1)
    return wt.t().contiguous()


@torch.library.custom_op(_LMM, mutates_args=(), device_types="cpu")
def lattice_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    generators: torch.Tensor,
    group_bits: torch.Tensor,
    row_scale: Optional[torch.Tensor],
    col_scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    pack_bits: int,
    d: int,
    group_size: int,
    in_features: int,
    offset: float,
) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` for a glvq layer stored as in ``LatticeLinear``
    (CPU: decode in torch, then matmul; CUDA: the fused decode-GEMM kernels)."""
    w = dequantize_lattice_torch(qweight, generators, group_bits, row_scale, col_scale, pack_bits, d, group_size,
                                 in_features, offset).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@lattice_matmul.register_fake
def _lattice_matmul_fake(x, qweight, generators, group_bits, row_scale, col_scale, bias, pack_bits, d, group_size,
                         in_features, offset):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


#: Kernel layouts of lattice codes: id(qweight) -> (weakref, version, device, tensors)
_LATTICE_CACHE: dict = {}


def _lattice_layout(qweight, group_bits, row_scale, offset):
    key = id(qweight)
    hit = _LATTICE_CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == qweight._version and hit[2] == qweight.device:
        return hit[3]
    for k in [k for k, v in _LATTICE_CACHE.items() if v[0]() is None]:
        del _LATTICE_CACHE[k]
    qt = qweight.t().contiguous()
    centre = (-(2.0 ** (group_bits.to(torch.float32) - 1)) + float(offset)).to(qweight.device).contiguous()
    out = qweight.shape[0]
    r = (torch.ones(1, out, dtype=torch.float16, device=qweight.device) if row_scale is None
         else row_scale.to(torch.float16).reshape(1, out).contiguous())
    layout = (qt, centre, r)
    if not (qweight.is_cuda and torch.cuda.is_current_stream_capturing()):  # else: valid in the graph only
        _LATTICE_CACHE[key] = (weakref.ref(qweight), qweight._version, qweight.device, layout)
    return layout


def _lattice_matmul_cuda(x, qweight, generators, group_bits, row_scale, col_scale, bias, pack_bits, d, group_size,
                         in_features, offset):
    from . import lattice_matmul as kernel

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] > MAX_FUSED_BATCH:
        w = dequantize_lattice_torch(qweight, generators, group_bits, row_scale, col_scale, pack_bits, d, group_size,
                                     in_features, offset).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    qt, centre, r = _lattice_layout(qweight, group_bits, row_scale, offset)
    y = kernel(_kernel_dtype(x2), qt, generators.contiguous(), centre, r,
               None if col_scale is None else col_scale.contiguous(),
               None if bias is None else bias.to(torch.float32).contiguous(),
               bits=pack_bits, d=d, group_size=group_size, in_features=in_features)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


def lattice_supported(module) -> bool:
    """Whether :meth:`LatticeLinear.forward` can use the lattice op (no µ-law compander)."""
    return getattr(module, "mu", None) is None and module.group_size % module.d == 0


def lattice_linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a ``LatticeLinear`` through ``llm_adapter::lattice_matmul``."""
    return lattice_matmul(x, module.qweight, module.generators, module.group_bits, module.row_scale,
                          module.col_scale, module.bias, module.pack_bits, module.d, module.group_size,
                          module.in_features, module.offset)


# --------------------------------------------------------------------------- registration

CUDA_REGISTERED = False
if available():
    torch.library.register_kernel(_QMM, "cuda", _quant_matmul_cuda)
    lattice_matmul.register_kernel("cuda")(_lattice_matmul_cuda)
    CUDA_REGISTERED = True


# --------------------------------------------------------------------------- memory


def model_memory(model: torch.nn.Module) -> dict:
    """Bytes of `model`'s parameters and buffers, and what the same model takes in float16.

    The float16 figure counts every floating tensor at 2 bytes and replaces each packed
    linear (``QuantLinear``/``LatticeLinear``: anything with ``qweight``, ``in_features``,
    ``out_features``) by its ``out * in`` float16 weight (+ bias).

    Returns
    -------
    dict
        ``{"bytes": int, "fp16_bytes": int, "ratio": float}``.

    Examples
    --------
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> model_memory(m)
    {'bytes': 40, 'fp16_bytes': 20, 'ratio': 2.0}
    """
    actual = fp16 = 0
    seen = set()
    for mod in model.modules():
        packed = hasattr(mod, "qweight") and hasattr(mod, "in_features") and hasattr(mod, "out_features")
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if t is None:
                continue
            key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else (id(t),)
            if key in seen:
                continue
            seen.add(key)
            actual += t.numel() * t.element_size()
            if not packed:
                fp16 += t.numel() * (2 if t.is_floating_point() else t.element_size())
            elif name == "bias":
                fp16 += 2 * t.numel()
        if packed:
            fp16 += 2 * int(mod.in_features) * int(mod.out_features)
    return {"bytes": actual, "fp16_bytes": fp16, "ratio": actual / fp16 if fp16 else float("nan")}

r"""Inference module for packed low-bit weights: :class:`QuantLinear`, and :func:`replace_linear`.

Storage (the GPTQ orientation, so a GPU kernel can read the GPTQ layout directly):

==========  =========  ===================================  ================================
buffer      dtype      shape                                meaning
==========  =========  ===================================  ================================
qweight     int32      (packed_length(in, bits), out)       codes packed along the input dim
scales      float16    (n_groups, out)                      step per group and output
zeros       float16    (n_groups, out)                      zero point (code units)
g_idx       int32      (in,) or absent                      group of each input column;
                                                            absent means ``i // group_size``
bias        float      (out,) or absent
==========  =========  ===================================  ================================

.. math::

    W_{ji} = s_{g(i), j}\,(q_{ij} - z_{g(i), j}), \qquad y = x W^\top + b .

Dispatch of :meth:`QuantLinear.forward`:

* CUDA input and a CUDA kernel registered for ``torch.ops.llm_adapter.quant_matmul``:
  the op (fused dequantize-GEMM/GEMV, no fp weight kept).
* Otherwise (CPU, or no CUDA kernel yet) the fallback, used automatically: the weight is
  dequantized once to the input's dtype and device, cached on the module (dropped on
  ``.to()`` / ``load_state_dict``), and multiplied with :func:`torch.nn.functional.linear`.

The custom op ``llm_adapter::quant_matmul`` is registered here with a CPU implementation
(dequantize + matmul) and a fake (meta) implementation, so ``torch.compile`` and
``opcheck`` can trace it. The CUDA implementation (numba-cuda W{2,3,4}A16 kernels,
:mod:`llm_adapter.kernels`) is registered by :mod:`llm_adapter.kernels.torch_ops`, imported
at the end of this module; :class:`LatticeLinear` dispatches likewise to
``llm_adapter::lattice_matmul`` on CUDA inputs.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import methods
from ..formats.packing import pack, pack_width, packed_length, unpack
from ..methods.glvq import LatticeLayer
from ..methods.uniform import QuantizedLayer

__all__ = ["LatticeLinear", "QuantLinear", "dequantize_packed", "quant_matmul", "replace_linear", "unpack_torch"]

logger = logging.getLogger(__name__)

#: Code widths and group sizes :class:`QuantLinear` accepts (-1: per-channel).
QUANT_LINEAR_BITS = (2, 3, 4)
QUANT_LINEAR_GROUP_SIZES = (32, 64, 128, -1)

_OP_NAME = "llm_adapter::quant_matmul"


# --------------------------------------------------------------------------- torch unpacking


def unpack_torch(qweight: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack codes packed along dim 0 (:func:`llm_adapter.formats.packing.pack` layout).

    Parameters
    ----------
    qweight : (packed_length(n, bits), out) int32 tensor
    bits : {2, 3, 4, 8}
    n : int
        Number of values along dim 0.

    Returns
    -------
    (n, out) int64 tensor, on `qweight`'s device.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from llm_adapter.formats.packing import pack
    >>> codes = np.array([[0, 3], [1, 2], [2, 1], [3, 0]])  # (in=4, out=2), 2-bit
    >>> qweight = torch.from_numpy(pack(codes, 2, axis=0))  # 16 values per word
    >>> qweight.shape
    torch.Size([1, 2])
    >>> unpack_torch(qweight, 2, 4).tolist()
    [[0, 3], [1, 2], [2, 1], [3, 0]]
    """
    m, out = qweight.shape
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    n_blocks = -(-m // bits)
    if n_blocks * bits != m:
        words = torch.cat([words, words.new_zeros(n_blocks * bits - m, out)])
    blocks = words.reshape(n_blocks, bits, out)
    mask = (1 << bits) - 1
    cols = []
    for k in range(32):
        offset = bits * k
        w, sh = divmod(offset, 32)
        v = blocks[:, w] >> sh
        if sh + bits > 32:
            v = v | (blocks[:, w + 1] << (32 - sh))
        cols.append(v & mask)
    return torch.stack(cols, dim=1).reshape(n_blocks * 32, out)[:n]


def _group_index(g_idx: Optional[torch.Tensor], group_size: int, n: int, device) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    if group_size == -1:
        return torch.zeros(n, dtype=torch.long, device=device)
    return torch.arange(n, device=device) // group_size


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight ``(out, in)``: ``s[g(i), j] * (q[i, j] - z[g(i), j])``, computed in
    float32 (so it equals :meth:`QuantizedLayer.dequantize` with the same scales), then cast
    to `dtype`.

    Parameters
    ----------
    qweight : (packed_length(in_features, bits), out) int32 tensor
        Codes packed along the input dimension (:class:`QuantLinear` layout).
    scales, zeros : (n_groups, out) tensors
        Step and zero point (code units) per group and output.
    g_idx : (in_features,) integer tensor or None
        Group of each input column; ``None`` means ``i // group_size``.
    bits : {2, 3, 4, 8}
    group_size : int
        Input columns per group, -1 for one group (per-channel); used when `g_idx` is
        ``None``.
    in_features : int
        Number of input columns (the packed axis is padded).
    dtype : torch.dtype, default torch.float32
        dtype of the result.

    Returns
    -------
    (out, in_features) tensor of `dtype`, on `qweight`'s device.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from llm_adapter.formats.packing import pack
    >>> from llm_adapter.methods.uniform import QuantizedLayer
    >>> q = QuantizedLayer(codes=np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8),
    ...                    scales=np.array([[0.5], [0.25]], dtype=np.float32),
    ...                    zeros=np.array([[1.0], [2.0]], dtype=np.float32),
    ...                    g_idx=np.zeros(4, dtype=np.int32), bits=2, group_size=-1)
    >>> W = dequantize_packed(torch.from_numpy(pack(q.codes.T, 2, axis=0)),
    ...                       torch.from_numpy(q.scales.T), torch.from_numpy(q.zeros.T),
    ...                       None, bits=2, group_size=-1, in_features=4)
    >>> W.tolist()
    [[-0.5, 0.0, 0.5, 1.0], [0.25, 0.0, -0.25, -0.5]]
    >>> bool(torch.equal(W, torch.from_numpy(q.dequantize())))
    True
    """
    q = unpack_torch(qweight, bits, in_features).to(torch.float32)  # (in, out)
    g = _group_index(g_idx, group_size, in_features, qweight.device)
    s = scales.to(torch.float32)[g]
    z = zeros.to(torch.float32)[g]
    return (s * (q - z)).t().contiguous().to(dtype)


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op(_OP_NAME, mutates_args=(), device_types="cpu")
def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` for packed ``W`` (CPU: dequantize, then matmul).

    A CUDA implementation is registered by the GPU kernels with
    ``quant_matmul.register_kernel("cuda")``.
    """
    w = dequantize_packed(qweight, scales, zeros, g_idx, bits, group_size, in_features, x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, b)


@quant_matmul.register_fake
def _quant_matmul_fake(x, qweight, scales, zeros, g_idx, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def has_cuda_kernel() -> bool:
    """Whether a CUDA implementation of ``llm_adapter::quant_matmul`` is registered."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, "CUDA"))
    except (AttributeError, RuntimeError):  # private API moved
        return False


# --------------------------------------------------------------------------- module


class _CachedWeightLinear(torch.nn.Module):
    """Shared by :class:`QuantLinear` and :class:`LatticeLinear`: the dequantized weight is
    computed by the subclass's ``dequantize(dtype)`` on first use, cached per dtype and
    device, and dropped on ``.to()`` / ``load_state_dict`` / :meth:`clear_cache`."""

    _cache: torch.Tensor | None = None

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, {type(self).__name__} expects {self.in_features}")

    def _weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        c = self._cache
        if c is None or c.dtype != dtype or c.device != device:
            with torch.inference_mode(False), torch.no_grad():
                c = self.dequantize(dtype).to(device)
            self._cache = c
        return c

    def _linear_cached(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight(x.dtype, x.device)
        b = None if self.bias is None else self.bias.to(dtype=x.dtype, device=x.device)
        return F.linear(x, w, b)

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight."""
        self._cache = None

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)


class QuantLinear(_CachedWeightLinear):
    """A linear layer with packed 2/3/4-bit weights, fp16 scales and zeros.

    Parameters
    ----------
    in_features, out_features : int
    bits : {2, 3, 4}
    group_size : {32, 64, 128, -1}
        Input columns per group; -1 is one group per output (per-channel). A last
        partial group is allowed when it does not divide `in_features`.
    qweight : (packed_length(in_features, bits), out_features) int32 tensor
        Codes packed along the input dimension (:func:`llm_adapter.formats.packing.pack`
        with ``axis=0`` on the ``(in, out)`` codes).
    scales, zeros : (n_groups, out_features) tensors
        Stored as float16. ``n_groups = ceil(in / group_size)`` (1 per-channel). Scales
        must be finite and positive, zeros finite in ``[0, 2**bits - 1]``.
    g_idx : (in_features,) integer tensor, optional
        Group of each input column, values in ``[0, n_groups)``; default ``i // group_size``.
    bias : (out_features,) tensor, optional

    Raises
    ------
    ValueError
        Naming the argument, if any constraint is violated.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.uniform import QuantizedLayer
    >>> rng = np.random.default_rng(0)
    >>> layer = QuantizedLayer(codes=rng.integers(0, 8, (4, 64)).astype(np.uint8),
    ...     scales=np.full((4, 1), 0.5, np.float32), zeros=np.full((4, 1), 3.0, np.float32),
    ...     g_idx=np.zeros(64, np.int32), bits=3, group_size=-1)
    >>> m = QuantLinear.from_quantized(layer)
    >>> m(torch.ones(2, 64)).shape
    torch.Size([2, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        in_features, out_features = int(in_features), int(out_features)
        if bits not in QUANT_LINEAR_BITS or isinstance(bits, bool):
            raise ValueError(f"`bits` must be one of {QUANT_LINEAR_BITS}, got {bits!r}")
        if group_size not in QUANT_LINEAR_GROUP_SIZES or isinstance(group_size, bool):
            raise ValueError(
                f"`group_size` must be one of {QUANT_LINEAR_GROUP_SIZES} (-1: per-channel), got {group_size!r}"
            )
        n_groups = 1 if group_size == -1 else -(-in_features // group_size)
        want = (packed_length(in_features, bits), out_features)
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or tuple(qweight.shape) != want:
            raise ValueError(
                f"`qweight` must be an int32 tensor of shape {want} (codes packed along the input dim), got "
                f"{getattr(qweight, 'dtype', type(qweight).__name__)} {tuple(getattr(qweight, 'shape', ()))}"
            )
        maxq = (1 << bits) - 1
        for name, t in (("scales", scales), ("zeros", zeros)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (n_groups, out_features):
                raise ValueError(
                    f"`{name}` must be a float tensor of shape (n_groups, out_features) = "
                    f"({n_groups}, {out_features}), got {getattr(t, 'dtype', type(t).__name__)} "
                    f"{tuple(getattr(t, 'shape', ()))}"
                )
        scales16, zeros16 = scales.detach().to(torch.float16), zeros.detach().to(torch.float16)
        if not bool(torch.isfinite(scales16).all()) or not bool((scales16 > 0).all()):
            raise ValueError("`scales` must be finite and positive (after conversion to float16)")
        if not bool(torch.isfinite(zeros16).all()) or bool((zeros16 < 0).any()) or bool((zeros16 > maxq).any()):
            raise ValueError(f"`zeros` must be finite and lie in [0, {maxq}] for bits={bits}")
        if g_idx is not None:
            if not isinstance(g_idx, torch.Tensor) or g_idx.is_floating_point() or tuple(g_idx.shape) != (in_features,):
                raise ValueError(f"`g_idx` must be an integer tensor of shape ({in_features},)")
            if bool((g_idx < 0).any()) or bool((g_idx >= n_groups).any()):
                raise ValueError(f"`g_idx` must lie in [0, {n_groups - 1}] (n_groups = {n_groups})")
            g_idx = g_idx.detach().to(torch.int32)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
                raise ValueError(f"`bias` must be a float tensor of shape ({out_features},)")
            bias = bias.detach().clone()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.n_groups = int(bits), int(group_size), n_groups
        self.register_buffer("qweight", qweight.detach().clone())
        self.register_buffer("scales", scales16.clone())
        self.register_buffer("zeros", zeros16.clone())
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", bias)
        self._cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def supports(cls, layer) -> bool:
        """Whether :meth:`from_layer` packs `layer` (its bits and group size are supported)."""
        return layer.bits in QUANT_LINEAR_BITS and layer.group_size in QUANT_LINEAR_GROUP_SIZES

    @classmethod
    def from_layer(cls, layer: QuantizedLayer, *, bias=None) -> "QuantLinear":
        """The registry's constructor: :meth:`from_quantized`."""
        return cls.from_quantized(layer, bias=bias)

    @classmethod
    def from_quantized(cls, layer: QuantizedLayer, *, bias=None) -> "QuantLinear":
        """Pack a :class:`QuantizedLayer` once. `bias` overrides ``layer.bias``.

        ``g_idx`` is kept only when it is not ``i // group_size``.
        """
        if not isinstance(layer, QuantizedLayer):
            raise TypeError(f"`layer` must be a QuantizedLayer, got {type(layer).__name__}")
        out_f, in_f = layer.shape
        if layer.bits not in QUANT_LINEAR_BITS:
            raise ValueError(f"`layer.bits` must be one of {QUANT_LINEAR_BITS}, got {layer.bits!r}")
        if layer.group_size not in QUANT_LINEAR_GROUP_SIZES:
            raise ValueError(
                f"`layer.group_size` must be one of {QUANT_LINEAR_GROUP_SIZES}, got {layer.group_size!r}"
            )
        codes = np.asarray(layer.codes)
        if codes.size and (codes.min() < 0 or codes.max() > (1 << layer.bits) - 1):
            raise ValueError(f"`layer.codes` must lie in [0, {(1 << layer.bits) - 1}] for bits={layer.bits}")
        qweight = torch.from_numpy(pack(codes.T, layer.bits, axis=0))
        g_idx = np.asarray(layer.g_idx)
        gs = in_f if layer.group_size == -1 else layer.group_size
        static = np.array_equal(g_idx, np.arange(in_f) // gs)
        if bias is None and layer.bias is not None:
            bias = torch.from_numpy(np.asarray(layer.bias, dtype=np.float32))
        return cls(
            in_f,
            out_f,
            bits=layer.bits,
            group_size=layer.group_size,
            qweight=qweight,
            scales=torch.from_numpy(np.ascontiguousarray(np.asarray(layer.scales, dtype=np.float32).T)),
            zeros=torch.from_numpy(np.ascontiguousarray(np.asarray(layer.zeros, dtype=np.float32).T)),
            g_idx=None if static else torch.from_numpy(g_idx.astype(np.int32)),
            bias=bias,
        )

    # ------------------------------------------------------------------ compute
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(out, in)`` (not cached)."""
        return dequantize_packed(
            self.qweight, self.scales, self.zeros, self.g_idx, self.bits, self.group_size, self.in_features, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.is_cuda and _kernel_ops.CUDA_REGISTERED:  # a constant: no graph break under torch.compile
            return quant_matmul(
                x, self.qweight, self.scales, self.zeros, self.g_idx, self.bias,
                self.bits, self.group_size, self.in_features,
            )
        return self._linear_cached(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, g_idx={self.g_idx is not None}, bias={self.bias is not None}"
        )


class LatticeLinear(_CachedWeightLinear):
    r"""A linear layer whose weight is stored as glvq codes (grouped lattice VQ).

    Holds a :class:`~llm_adapter.methods.glvq.LatticeLayer` in compressed form: codes
    packed into int32 words along the input dimension (``qcodes``, width = the smallest
    packing width holding ``max(group_bits)``: 2 bits for a plain W2 glvq layer), fp16
    generators, per-group bits, fp16 row/column scales and µ-law parameters when present.
    The forward pass decodes the weight once,
    :math:`\hat W_{j,g} = r_j\, c_g \circ G_g (z_{j,g} + o)` per sub-vector (exactly
    :meth:`LatticeLayer.dequantize`, in float64 on the CPU), caches it on the input's
    device and dtype, and applies ``F.linear``. On a CUDA input (no µ-law compander) it runs
    the fused decode-GEMM op ``llm_adapter::lattice_matmul`` (:mod:`llm_adapter.kernels`)
    instead, with no dequantized weight.

    Parameters
    ----------
    layer : LatticeLayer
        The quantized layer (see :func:`~llm_adapter.methods.glvq.quantize_weight_glvq`).
    bias : torch.Tensor, optional
        Overrides ``layer.bias``.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 32)); X = rng.standard_normal((32, 128))
    >>> q = quantize_weight_glvq(W, X @ X.T, spec=GLVQSpec(bits=2, d=4, group_size=16, n_iter=2),
    ...                          backend="numpy")
    >>> m = LatticeLinear(q)
    >>> m
    LatticeLinear(in_features=32, out_features=8, d=4, group_size=16, bits=[2], bias=False)
    >>> x = torch.ones(3, 32)
    >>> bool(torch.allclose(m(x), x @ torch.from_numpy(q.dequantize()).T))
    True
    >>> m.qweight.dtype, tuple(m.qweight.shape)  # 2-bit codes, 16 per int32 word
    (torch.int32, (8, 2))
    """

    def __init__(self, layer, *, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(layer, LatticeLayer):
            raise TypeError(f"`layer` must be a LatticeLayer, got {type(layer).__name__}")
        out_f, in_f = layer.shape
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.d, self.group_size, self.offset = int(layer.d), int(layer.group_size), float(layer.offset)
        self.pack_bits = pack_width(int(np.max(layer.group_bits)))
        self.register_buffer("qweight", torch.from_numpy(pack(np.asarray(layer.codes), self.pack_bits, axis=1)))
        self.register_buffer("generators", torch.from_numpy(np.asarray(layer.generators, dtype=np.float16).copy()))
        self.register_buffer("group_bits", torch.from_numpy(np.asarray(layer.group_bits, dtype=np.uint8).copy()))
        for name in ("row_scale", "col_scale", "mu", "amax"):
            v = getattr(layer, name)
            self.register_buffer(name, None if v is None else torch.from_numpy(np.asarray(v, dtype=np.float16).copy()))
        if bias is None and layer.bias is not None:
            bias = torch.from_numpy(np.asarray(layer.bias, dtype=np.float32))
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_f,):
                raise ValueError(f"`bias` must be a float tensor of shape ({out_f},)")
            bias = bias.detach().clone()
        self.register_buffer("bias", bias)
        self._cache: torch.Tensor | None = None

    @classmethod
    def supports(cls, layer) -> bool:
        """``True``: every glvq layer can be held."""
        return True

    @classmethod
    def from_layer(cls, layer: LatticeLayer, *, bias=None) -> "LatticeLinear":
        """The registry's constructor: ``LatticeLinear(layer, bias=bias)``."""
        return cls(layer, bias=bias)

    def to_lattice_layer(self):
        """The stored :class:`~llm_adapter.methods.glvq.LatticeLayer` (numpy arrays, CPU)."""
        def np_or_none(t):
            return None if t is None else t.detach().cpu().numpy()

        return LatticeLayer(
            codes=unpack(self.qweight.cpu().numpy(), self.pack_bits, self.in_features, axis=1),
            generators=np_or_none(self.generators), group_bits=np_or_none(self.group_bits),
            d=self.d, group_size=self.group_size, offset=self.offset,
            row_scale=np_or_none(self.row_scale), col_scale=np_or_none(self.col_scale),
            mu=np_or_none(self.mu), amax=np_or_none(self.amax), bias=np_or_none(self.bias))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(out, in)`` on the CPU (not cached)."""
        return torch.from_numpy(self.to_lattice_layer().dequantize(np.float64)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.is_cuda and _kernel_ops.CUDA_REGISTERED and _kernel_ops.lattice_supported(self):
            return _kernel_ops.lattice_linear(self, x)  # fused decode-GEMM (llm_adapter.kernels)
        return self._linear_cached(x)

    def extra_repr(self) -> str:
        bits = sorted({int(b) for b in self.group_bits.tolist()})
        return (f"in_features={self.in_features}, out_features={self.out_features}, d={self.d}, "
                f"group_size={self.group_size}, bits={bits}, bias={self.bias is not None}")


def replace_linear(model: torch.nn.Module, layers: dict) -> torch.nn.Module:
    """Swap the ``nn.Linear`` (and ``Conv1D``) modules named in `layers` for their methods'
    torch modules, in place; fused MoE expert layers are dequantized into their slice.

    The module class comes from the method registry (:attr:`llm_adapter.methods.Method.module`):
    uniform layers become :class:`QuantLinear`, glvq layers
    (:class:`~llm_adapter.methods.glvq.LatticeLayer`) :class:`LatticeLinear`.

    A transformers ``Conv1D`` (GPT-2, weight ``(in, out)``) is replaced by the same module
    as a Linear: the quantized layer is its ``(out, in)`` transpose and ``x W^T + b`` is
    what ``Conv1D`` computes. A name ``<experts module>.<3-D parameter>.<e>`` (one expert
    of fused MoE weights, :mod:`llm_adapter.nn.fused`) is dequantized on the CPU into
    ``parameter[e]``; the experts module keeps its own forward.

    Every name is checked first (it must be an ``nn.Linear``/``Conv1D`` of `model` or an
    expert slot, with the layer's shape); nothing is replaced if any check fails. The new module is put on the old
    one's device; the old bias is used when the quantized layer carries none.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    layers : dict of str to QuantizedLayer or LatticeLayer
        Module name (as in ``model.named_modules()``) to its quantized layer, e.g. the
        result of :func:`llm_adapter.calibration.quantize_model` or
        :func:`llm_adapter.formats.native.load_quantized`.

    Returns
    -------
    torch.nn.Module
        `model`.

    Raises
    ------
    KeyError
        Listing the names that are not modules of `model`.
    ValueError
        If a named module is not an ``nn.Linear`` or its shape differs.

    Examples
    --------
    >>> from llm_adapter.methods.uniform import quantize_weight
    >>> from llm_adapter.methods.uniform import QuantSpec
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(),
    ...                             torch.nn.Linear(16, 4))
    >>> q = quantize_weight(model[0].weight, spec=QuantSpec(bits=4, method="rtn"))
    >>> replace_linear(model, {"0": q})[0]
    QuantLinear(in_features=64, out_features=16, bits=4, group_size=-1, g_idx=False, bias=True)
    >>> model(torch.ones(2, 64)).shape
    torch.Size([2, 4])
    >>> replace_linear(model, {"5": q})
    Traceback (most recent call last):
        ...
    KeyError: "`layers` names 1 module(s) that `model` does not have: ['5']"
    """
    from .fused import expert_slot, is_conv1d, write_dequantized

    modules = dict(model.named_modules())
    experts = {n: l for n, l in layers.items() if n not in modules and expert_slot(modules, n) is not None}
    unknown = [n for n in layers if n not in modules and n not in experts]
    if unknown:
        raise KeyError(
            f"`layers` names {len(unknown)} module(s) that `model` does not have: {unknown[:5]}"
            + (" ..." if len(unknown) > 5 else "")
        )
    classes = {}
    for name, layer in layers.items():
        if name in experts:
            continue
        mod = modules[name]
        try:
            classes[name] = methods.for_layer(layer).module_class()
        except TypeError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        if not isinstance(mod, torch.nn.Linear) and not is_conv1d(mod):
            raise ValueError(f"module {name!r} is a {type(mod).__name__}, not an nn.Linear")
        shape = tuple(mod.weight.shape)[::-1] if is_conv1d(mod) else tuple(mod.weight.shape)
        if shape != tuple(layer.shape):
            raise ValueError(
                f"module {name!r} has weight shape {shape} (out, in), the quantized layer {tuple(layer.shape)}"
            )
    for name, layer in experts.items():
        _, param, e = expert_slot(modules, name)
        w = getattr(_, param)[e]
        if tuple(w.shape) != tuple(layer.shape):
            raise ValueError(f"expert {name!r} has weight shape {tuple(w.shape)}, the quantized layer {tuple(layer.shape)}")
    for name, layer in layers.items():
        if name in experts:
            continue
        mod = modules[name]
        bias = None
        if layer.bias is None and mod.bias is not None:
            bias = mod.bias.detach().to(torch.float32).cpu()
        new = classes[name].from_layer(layer, bias=bias).to(mod.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if experts:
        write_dequantized(model, experts, modules)
        logger.info("wrote %d fused expert layers (dequantized on the CPU)", len(experts))
    logger.info("replaced %d linear layers with quantized modules", len(layers))
    return model


# CUDA implementations of the ops (llm_adapter.kernels; imports torch only, numba lazily).
from ..kernels import torch_ops as _kernel_ops  # noqa: E402

r"""GPU inference kernels for packed low-bit weights (numba-cuda), and their torch ops.

Two products, each computed straight from the packed codes (no dequantized weight):

* :func:`quant_matmul` — ``y = x @ dequant(W).T (+ bias)`` for the GPTQ layout
  (:class:`~llm_adapter.nn.QuantLinear`'s buffers), bits 2, 3, 4 (and 8),
* :func:`lattice_matmul` — the glvq twin: ``y = x @ \hat W^T (+ bias)`` with
  :math:`\hat W_{j,s} = r_j\, c_s \circ G_g (z_{js} + o)` decoded inside the product
  (:func:`lattice_matmul_reference` is the algorithm in numpy).

Arrays: CuPy arrays or CUDA torch tensors (launched on the current CuPy / torch stream,
results on the same device), or — in numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``) —
numpy arrays. Activations float16 or float32 (torch bfloat16 goes through float32 at the
op boundary: numba-cuda 0.30 cannot type a bfloat16 array from the CUDA array interface),
accumulation in float32, the result in the activation dtype.

Batches of up to 16 rows read every weight once (batch tiles 1, 2, 4, 8, 16); larger
batches run in tiles of 16 (the torch op dequantizes transiently and calls cuBLAS
instead). Launch sizes live in :data:`LAUNCH` (tests shrink them).

The torch ops (``llm_adapter::quant_matmul``, ``llm_adapter::lattice_matmul``) are in
:mod:`llm_adapter.kernels.torch_ops`. Importing this package does not import numba.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from ._config import BATCH_TILES, LAUNCH, TRANSFORM_THREADS
from .lattice import KERNEL_PACK_BITS, lattice_matmul_reference, pack_lattice_layer

__all__ = [
    "BATCH_TILES",
    "KERNEL_BITS",
    "KERNEL_PACK_BITS",
    "LAUNCH",
    "TRANSFORM_THREADS",
    "available",
    "lattice_matmul",
    "lattice_matmul_reference",
    "pack_lattice_layer",
    "quant_matmul",
]

logger = logging.getLogger(__name__)

#: Code widths of :func:`quant_matmul`.
KERNEL_BITS = (2, 3, 4, 8)


def available() -> bool:
    """Whether numba-cuda is installed (the kernels can be compiled; a device may still be absent)."""
    return importlib.util.find_spec("numba_cuda") is not None


# --------------------------------------------------------------------------- arrays


class _Arrays:
    """Allocation and launch plumbing for one array family (numpy/sim, cupy, torch)."""

    def __init__(self, kind, ref):
        self.kind = kind
        self.ref = ref  # an input array: device and family

    @staticmethod
    def of(x) -> "_Arrays":
        mod = type(x).__module__.split(".")[0]
        if mod == "torch":
            if not x.is_cuda:
                raise ValueError("`x` is a CPU torch tensor: the kernels need CUDA tensors "
                                 "(use llm_adapter.nn.dequantize_packed on the CPU)")
            return _Arrays("torch", x)
        if mod == "cupy":
            return _Arrays("cupy", x)
        if isinstance(x, np.ndarray):
            from ._kernels import SIMULATOR

            if not SIMULATOR:
                raise ValueError("`x` is a numpy array: numpy arrays run only in numba-cuda's simulator "
                                 "(NUMBA_ENABLE_CUDASIM=1); pass CuPy arrays or CUDA torch tensors")
            return _Arrays("numpy", x)
        raise TypeError(f"`x` must be a CuPy array, a CUDA torch tensor or (simulator) a numpy array, "
                        f"got {type(x).__name__}")

    def dtype_name(self, a) -> str:
        return str(a.dtype).removeprefix("torch.")

    def empty(self, shape, dtype: str):
        if self.kind == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.ref.device)
        if self.kind == "cupy":
            import cupy

            with self.ref.device:
                return cupy.empty(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype: str):
        if self.kind == "torch":
            import torch

            return torch.zeros(shape, dtype=getattr(torch, dtype), device=self.ref.device)
        if self.kind == "cupy":
            import cupy

            with self.ref.device:
                return cupy.zeros(shape, dtype=dtype)
        return np.zeros(shape, dtype=dtype)

    def asarray(self, a, dtype: str):
        """`a` (same family, or numpy for small host data) contiguous with `dtype`."""
        if self.kind == "torch":
            import torch

            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
            return t.to(device=self.ref.device, dtype=getattr(torch, dtype)).contiguous()
        if self.kind == "cupy":
            import cupy

            with self.ref.device:
                return cupy.ascontiguousarray(cupy.asarray(a, dtype=dtype))
        return np.ascontiguousarray(np.asarray(a, dtype=dtype))

    def dev(self, a):
        """What a numba kernel takes: a device array view (no copy, no stream sync)."""
        if self.kind == "numpy":
            return a
        from numba import cuda

        return cuda.as_cuda_array(a, sync=False)

    def stream(self):
        from numba import cuda

        if self.kind == "torch":
            import torch

            return cuda.external_stream(torch.cuda.current_stream(self.ref.device).cuda_stream)
        if self.kind == "cupy":
            import cupy

            return cuda.external_stream(cupy.cuda.get_current_stream().ptr)
        return 0

    def const_zeros(self, shape, dtype: str):
        """A zero array that kernels only read, cached per device (no allocation per call)."""
        if self.kind == "numpy":
            return np.zeros(shape, dtype)
        key = (self.kind, str(getattr(self.ref, "device", "")), tuple(shape), dtype)
        buf = _CONST_ZEROS.get(key)
        if buf is None:
            buf = self.zeros(tuple(shape), dtype)
            if not self._capturing():  # a buffer zeroed inside a graph capture is zero only in the graph
                _CONST_ZEROS[key] = buf
        return buf

    def _capturing(self) -> bool:
        if self.kind == "torch":
            import torch

            return bool(torch.cuda.is_current_stream_capturing())
        if self.kind == "cupy":
            import cupy

            try:
                return bool(cupy.cuda.get_current_stream().is_capturing())
            except (AttributeError, RuntimeError):  # old CuPy, or the legacy null stream
                return False
        return False

    def workspace_counters(self, n: int):
        """`n` split-K counters at zero. Kernels leave their counters at zero, so they come
        round-robin from one zeroed pool per device (no memset per call, none in a CUDA
        graph); calls far apart in the pool may run concurrently on different streams."""
        if self.kind == "numpy":
            return np.zeros(n, np.int32)
        key = (self.kind, str(getattr(self.ref, "device", "")))
        pool = _COUNTERS.get(key)
        if pool is None:
            if self._capturing():  # zeroed inside the capture: valid in the graph only
                return self.zeros((n,), "int32")
            pool = _COUNTERS[key] = [self.zeros((COUNTER_POOL,), "int32"), 0]
        buf, off = pool
        if off + n > buf.shape[0]:
            off = 0
        pool[1] = off + n
        return buf[off:off + n]


#: Split-K counters per device (int32): the pool the launches take their counters from.
COUNTER_POOL = 1 << 20

_COUNTERS: dict = {}
_CONST_ZEROS: dict = {}


def _tile(batch: int) -> int:
    for nb in BATCH_TILES:
        if nb >= batch:
            return nb
    return BATCH_TILES[-1]


# --------------------------------------------------------------------------- GPTQ layout


def _check_int(name, v, lo=None):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"`{name}` must be an int, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"`{name}` must be >= {lo}, got {v}")
    return int(v)


def _quant_matmul_iv(x, qweight, scales, zeros, g_idx, bits, group_size, in_features, bias):
    from ..formats.packing import packed_length, period

    arrays = _Arrays.of(x)
    bits = _check_int("bits", bits)
    if bits not in KERNEL_BITS:
        raise ValueError(f"`bits` must be one of {KERNEL_BITS}, got {bits}")
    in_features = _check_int("in_features", in_features, 1)
    group_size = _check_int("group_size", group_size)
    if group_size != -1 and group_size < 1:
        raise ValueError(f"`group_size` must be positive or -1 (per-channel), got {group_size}")
    if len(x.shape) != 2 or x.shape[1] != in_features:
        raise ValueError(f"`x` must be (batch, in_features) = (batch, {in_features}), got {tuple(x.shape)}")
    if arrays.dtype_name(x) not in ("float16", "float32"):
        raise ValueError(f"`x` must be float16 or float32 (convert bfloat16 at the boundary), got {x.dtype}")
    want_words = packed_length(in_features, bits)
    if len(qweight.shape) != 2 or qweight.shape[0] != want_words or arrays.dtype_name(qweight) not in ("int32", "uint32"):
        raise ValueError(f"`qweight` must be int32 (packed_length(in_features, bits), out) = ({want_words}, out), "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    n_out = qweight.shape[1]
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    for name, a in (("scales", scales), ("zeros", zeros)):
        if len(a.shape) != 2 or a.shape[1] != n_out or a.shape[0] < 1:
            raise ValueError(f"`{name}` must be (n_groups, out) with out = {n_out}, got {tuple(a.shape)}")
    if scales.shape != zeros.shape:
        raise ValueError(f"`scales` and `zeros` must have the same shape, got {tuple(scales.shape)} and "
                         f"{tuple(zeros.shape)}")
    if g_idx is None and scales.shape[0] != n_groups:
        raise ValueError(f"`scales` must have n_groups = {n_groups} rows for group_size {group_size}, "
                         f"got {scales.shape[0]}")
    if g_idx is not None and (len(g_idx.shape) != 1 or g_idx.shape[0] != in_features):
        raise ValueError(f"`g_idx` must be ({in_features},), got {tuple(g_idx.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"`bias` must be ({n_out},), got {tuple(bias.shape)}")
    P, _ = period(bits)
    return arrays, bits, group_size, in_features, n_out, P


def quant_matmul(x, qweight, scales, zeros, g_idx, bits, group_size, in_features, *, bias=None):
    r"""``y = x @ dequant(W).T (+ bias)`` straight from the packed GPTQ layout.

    .. math::

        y_{bj} = \sum_i x_{bi}\, s_{g(i), j}\,(q_{ij} - z_{g(i), j}) \;(+\, \beta_j),

    accumulated in float32; every weight word is read once per batch tile of up to 16 rows.

    Parameters
    ----------
    x : (batch, in_features) float16 or float32 array
        CuPy array, CUDA torch tensor, or (simulator only) numpy array.
    qweight : (packed_length(in_features, bits), out) int32 array
        Codes packed along the input dimension (``QuantLinear.qweight``, the GPTQ ``qweight``).
    scales, zeros : (n_groups, out) float16 or float32 arrays
        Step and zero point (code units) per group and output (zeros *unpacked*, as in
        :class:`~llm_adapter.nn.QuantLinear`; GPTQ's v1 ``qzeros`` store ``zero - 1``).
    g_idx : (in_features,) int32 array or None
        Group of each input column (act-order); ``None`` means ``i // group_size``.
    bits : {2, 3, 4, 8}
    group_size : int
        Input columns per group, -1 for one group.
    in_features : int
    bias : (out,) array, optional

    Returns
    -------
    (batch, out) array of `x`'s dtype, same family and device as `x`.

    Raises
    ------
    ValueError
        Naming the argument, for a wrong shape, dtype or value; or numpy arrays outside
        the simulator.

    Notes
    -----
    Launch (see :data:`LAUNCH`): grid ``(ceil(out / tx), ceil(in / kv))``, split-K over the
    grid's y dimension, finished by the last block of each column tile. Act-order runs a
    per-value group lookup (slower than static groups; no repacking is done).

    Examples
    --------
    Under the simulator (``NUMBA_ENABLE_CUDASIM=1``), with numpy arrays:

    >>> import numpy as np
    >>> from llm_adapter.formats.packing import pack
    >>> codes = np.arange(64).reshape(32, 2) % 16             # (in, out), 4-bit
    >>> qweight = pack(codes, 4, axis=0)                      # (4, 2) int32
    >>> scales = np.full((1, 2), 0.5, np.float16); zeros = np.full((1, 2), 8, np.float16)
    >>> x = np.ones((1, 32), np.float32)
    >>> y = quant_matmul(x, qweight, scales, zeros, None, 4, -1, 32)  # doctest: +SKIP
    >>> y.tolist()                                                     # doctest: +SKIP
    [[-8.0, 0.0]]
    """
    arrays, bits, group_size, in_features, n_out, P = _quant_matmul_iv(
        x, qweight, scales, zeros, g_idx, bits, group_size, in_features, bias)
    pow2 = group_size > 0 and group_size & (group_size - 1) == 0 and group_size % P == 0
    use_gidx = g_idx is not None or (group_size != -1 and not pow2)
    if g_idx is None and use_gidx:
        g_idx = np.arange(in_features, dtype=np.int32) // group_size
    gshift = _PER_CHANNEL_SHIFT if group_size == -1 else group_size.bit_length() - 1
    gidx = arrays.asarray(g_idx, "int32") if use_gidx else arrays.const_zeros((1,), "int32")
    return _qmm_launch(arrays, x, qweight, scales, zeros, gidx, use_gidx, gshift, in_features, n_out, bits,
                       bias, None, None)


#: ``i >> 40 == 0`` for every column index: one group.
_PER_CHANNEL_SHIFT = 40


def _qmm_launch(arrays, x, qweight, scales, zeros, gidx, use_gidx, gshift, in_features, n_out, bits, bias,
                eparts, escale, out_dtype=None):
    """Launch the GEMV/GEMM kernel over batch tiles of at most 16 rows (`x` validated)."""
    from ._kernels import qmm_kernel

    batch = x.shape[0]
    y = arrays.empty((batch, n_out), out_dtype or arrays.dtype_name(x))
    if batch == 0 or n_out == 0:
        return y
    stream = arrays.stream()
    dummy = arrays.const_zeros((1,), "float32")
    has_bias = bias is not None
    b_arr = bias if has_bias else dummy
    n_ep = 0 if eparts is None else int(eparts.shape[1])
    top = BATCH_TILES[-1]
    for r0 in range(0, batch, top):
        rows = min(top, batch - r0)
        nb = _tile(rows)
        cfg = LAUNCH[nb]
        tx, ty, kv = int(cfg["tx"]), int(cfg["ty"]), int(cfg["kv"])
        kernel = qmm_kernel(bits, nb, tx, ty, kv)
        grid = (-(-n_out // tx), -(-in_features // kv))
        n_split = grid[1]
        part = arrays.empty((n_split, rows, n_out), "float32") if n_split > 1 else arrays.const_zeros((1, 1, 1), "float32")
        counters = arrays.workspace_counters(grid[0]) if n_split > 1 else arrays.const_zeros((1,), "int32")
        xs = x[r0:r0 + rows]
        ys = y[r0:r0 + rows]
        ep = eparts[r0:r0 + rows] if eparts is not None else arrays.const_zeros((1, 1), "float32")
        es = escale if escale is not None else dummy
        args = (xs, qweight, scales, zeros, gidx, np.int32(use_gidx), np.int32(gshift), np.int32(in_features),
                b_arr, np.int32(has_bias), ep, es, np.int32(n_ep), part, counters, ys)
        args = tuple(arrays.dev(a) if hasattr(a, "shape") and not isinstance(a, np.generic) else a for a in args)
        kernel[grid, (tx, ty), stream](*args)
    return y


# --------------------------------------------------------------------------- glvq


def lattice_matmul(x, qweight_t, generators, centre, row_scale, col_scale, bias, *, bits, d, group_size,
                   in_features):
    r"""The glvq decode-GEMM: ``y = x @ \hat W^T (+ bias)`` from packed lattice codes.

    With :math:`u_{b,s_0+k} = \sum_i (G_g)_{ik}\, c_{s_0+i}\, x_{b,s_0+i}` (``d``-dim
    sub-vectors, the decode :math:`G z` moved onto the activations) and the centre
    :math:`\gamma_g = lo_g + o` of group ``g`` (``lo_g = -2^{b_g - 1}``, ``o`` the code offset):

    .. math::

        y_{bj} = r_j \Big(\sum_p u_{bp}\, q_{jp} + \sum_p \gamma_{g(p)} u_{bp}\Big) (+\, \beta_j).

    The first sum is the GPTQ kernel with one group, scale ``r`` and zero 0.

    Parameters
    ----------
    x : (batch, in_features) float16 or float32 array
    qweight_t : (packed_length(in_features, bits), out) int32 array
        Code offsets ``q`` packed along the input dimension in the GPTQ orientation
        (``LatticeLinear.qweight`` is its transpose: see :func:`pack_lattice_layer`).
    generators : (n_groups, d, d) float16 or float32 array
    centre : (n_groups,) float32 array
        :math:`\gamma_g`.
    row_scale : (1, out) float16 array
        :math:`r` (ones when the layer has none).
    col_scale : (in_features,) array or None
    bias : (out,) array or None
    bits : {2, 3, 4, 8}
        Packing width of the codes.
    d, group_size, in_features : int
        Sub-vector length, input columns per group (a multiple of `d`), input width.

    Returns
    -------
    (batch, out) array of `x`'s dtype.

    Raises
    ------
    ValueError
        Naming the argument.

    Examples
    --------
    See :func:`lattice_matmul_reference` for the algorithm on numpy arrays, and
    ``tests/gpu/test_sim_quant_matmul.py`` for simulator runs.
    """
    from ._kernels import transform_kernel

    d = _check_int("d", d, 1)
    group_size = _check_int("group_size", group_size, 1)
    if group_size % d:
        raise ValueError(f"`group_size` = {group_size} must be a multiple of `d` = {d}")
    if in_features % d:
        raise ValueError(f"`in_features` = {in_features} must be a multiple of `d` = {d}")
    arrays, bits, _, in_features, n_out, _ = _quant_matmul_iv(
        x, qweight_t, row_scale, row_scale, None, bits, -1, in_features, bias)
    n_groups = -(-in_features // group_size)
    if tuple(generators.shape) != (n_groups, d, d):
        raise ValueError(f"`generators` must be (n_groups, d, d) = ({n_groups}, {d}, {d}), got {tuple(generators.shape)}")
    if tuple(centre.shape) != (n_groups,):
        raise ValueError(f"`centre` must be ({n_groups},), got {tuple(centre.shape)}")
    if col_scale is not None and tuple(col_scale.shape) != (in_features,):
        raise ValueError(f"`col_scale` must be ({in_features},), got {tuple(col_scale.shape)}")
    batch = x.shape[0]
    T = int(TRANSFORM_THREADS["threads"])
    n_blocks = -(-in_features // T)
    u = arrays.empty((batch, in_features), "float32")
    cparts = arrays.empty((batch, n_blocks), "float32")
    if batch:
        dummy = arrays.const_zeros((1,), "float32")
        args = (x, generators, col_scale if col_scale is not None else dummy, np.int32(col_scale is not None),
                centre, np.int32(d), np.int32(group_size), u, cparts)
        args = tuple(arrays.dev(a) if hasattr(a, "shape") and not isinstance(a, np.generic) else a for a in args)
        transform_kernel(T)[(n_blocks, batch), T, arrays.stream()](*args)
    zeros = arrays.const_zeros(tuple(row_scale.shape), arrays.dtype_name(row_scale))
    y = _qmm_launch(arrays, u, qweight_t, row_scale, zeros, arrays.const_zeros((1,), "int32"), False,
                    _PER_CHANNEL_SHIFT, in_features, n_out, bits, bias, cparts, row_scale.reshape(-1), arrays.dtype_name(x))
    return y

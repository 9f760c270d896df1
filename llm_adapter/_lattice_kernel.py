r"""glvq decode-GEMV/GEMM: packing, a numpy reference, and a CuPy kernel (UNTESTED on a GPU).

.. warning::

    The CUDA source below has **never been run on a GPU**: it was written in sessions
    without one. It does compile (NVRTC, sm_80 and sm_90; ``tests/test_cuda_sources.py``
    checks that on every CPU test run, with the argument counts of the launches). :func:`lattice_matmul_reference` (numpy, tested in
    ``tests/test_lattice_method.py``) implements the same algorithm step by step and is
    the oracle a GPU test must compare :func:`lattice_matmul_cuda` against (and its
    latency against the uniform W2 kernel). Nothing imports this module by default.

The algorithm. For a :class:`~llm_adapter.methods.glvq.LatticeLayer` with uniform
``bits`` (no salience allocation), sub-vector ``s`` of group ``g`` of row ``j`` decodes to
:math:`\hat W_{j,s} = r_j\, c_s \circ G_g (z_{js} + o)` with :math:`z + o = q - (2^b-1)/2`
for the stored code offsets :math:`q \in [0, 2^b)` (default box, :math:`o = 1/2`). So

.. math::

    y_j = \sum_i x_i \hat W_{ji}
        = r_j \Big( \sum_p u_p\, q_{jp} - \tfrac{2^b-1}{2} \sum_p u_p \Big),
    \qquad u_{s,k} = \sum_{i} (G_g)_{ik}\, c_{s,i}\, x_{s,i},

i.e. "decode :math:`G z` inside the matmul" is done once per *activation* sub-vector
(:math:`u = \mathrm{blockdiag}(G_g^T)(c \circ x)`, ``in * d`` flops per token) instead of
once per weight sub-vector; the weight pass is then a plain unsigned-integer GEMV over the
packed codes with one fp16 scale per row — the same memory traffic as a uniform W2 kernel
without per-group scales and zeros.

Layout on the device: ``qcodes`` int32 ``(out, packed_length(in, bits))``, codes packed
along the input dimension per row with :func:`llm_adapter.formats.packing.pack` (low bits
first; ``bits`` in {2, 4}: no value straddles two words), so one warp reads one row
contiguously; ``generators`` fp16 ``(n_groups, d, d)``; ``row_scale`` fp16 ``(out,)``;
``col_scale`` fp16 ``(in,)`` or absent.
"""

from __future__ import annotations

import functools

import numpy as np

from .formats.packing import pack, unpack

__all__ = ["COMPILE_OPTIONS", "KERNEL_BITS", "LAUNCH", "pack_lattice_layer", "lattice_matmul_reference", "lattice_matmul_cuda"]

#: Code widths of the kernel (a value never straddles two int32 words).
KERNEL_BITS = (2, 4)

#: NVRTC options of :func:`_module` (also used by the no-GPU compile test, tests/test_cuda_sources.py).
COMPILE_OPTIONS = ("-std=c++14",)

#: Launch sizes, in one place so tests can shrink them to cross block boundaries.
LAUNCH = {"transform_threads": 256, "gemv_warps_per_block": 4}


def pack_lattice_layer(layer) -> dict:
    """Device layout of a uniform-bits :class:`LatticeLayer` (numpy arrays)."""
    bits = int(layer.group_bits[0])
    if np.any(layer.group_bits != bits):
        raise ValueError("the kernel needs the same `bits` in every group (no salience allocation)")
    if bits not in KERNEL_BITS:
        raise ValueError(f"the kernel supports bits in {KERNEL_BITS}, got {bits}")
    if layer.mu is not None:
        raise ValueError("the kernel does not implement the µ-law compander; use dequantize()")
    if layer.offset != 0.5:
        raise ValueError("the kernel assumes the default code offset 0.5")
    out, n = layer.codes.shape
    return {
        "qcodes": pack(layer.codes.astype(np.int64), bits, axis=1),
        "generators": layer.generators.astype(np.float16),
        "row_scale": None if layer.row_scale is None else layer.row_scale.astype(np.float16),
        "col_scale": None if layer.col_scale is None else layer.col_scale.astype(np.float16),
        "bias": None if layer.bias is None else layer.bias.astype(np.float32),
        "bits": bits, "d": layer.d, "group_size": layer.group_size, "in_features": n, "out_features": out,
    }


def lattice_matmul_reference(x, packed) -> np.ndarray:
    """``x @ dequantize(W).T + bias`` computed the way the kernel does (numpy, float64).

    Parameters
    ----------
    x : (B, in) array_like
    packed : dict
        From :func:`pack_lattice_layer`.
    """
    x = np.asarray(x, dtype=np.float64)
    bits, d, gs, n = packed["bits"], packed["d"], packed["group_size"], packed["in_features"]
    G = packed["generators"].astype(np.float64)
    xs = x if packed["col_scale"] is None else x * packed["col_scale"].astype(np.float64)
    # step 1 (glvq_transform): u_{s,k} = sum_i G_g[i, k] (c x)_{s,i}
    u = np.empty_like(xs)
    for s0 in range(0, n, d):
        u[:, s0:s0 + d] = xs[:, s0:s0 + d] @ G[s0 // gs]
    # step 2 (glvq_gemv): unsigned codes against u, minus the centre, times the row scale
    q = unpack(packed["qcodes"], bits, n, axis=1).astype(np.float64)  # (out, in)
    y = u @ q.T - 0.5 * ((1 << bits) - 1) * u.sum(axis=1, keepdims=True)
    if packed["row_scale"] is not None:
        y = y * packed["row_scale"].astype(np.float64)[None, :]
    if packed["bias"] is not None:
        y = y + packed["bias"].astype(np.float64)[None, :]
    return y


# --------------------------------------------------------------------------- CUDA (UNTESTED)
_SOURCE = r"""
#include <cuda_fp16.h>

// u[b, p] = sum_i G[g][i][k] * c[s0 + i] * x[b, s0 + i],  p = s0 + k, g = p / group_size
__global__ void glvq_transform(const float* __restrict__ x, const __half* __restrict__ G,
                               const __half* __restrict__ col_scale, float* __restrict__ u,
                               int B, int n, int d, int group_size)
{
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    int b = blockIdx.y;
    if (p >= n || b >= B) return;
    int s0 = (p / d) * d;
    int k = p - s0;
    const __half* Gg = G + (size_t)(p / group_size) * d * d;
    const float* xb = x + (size_t)b * n + s0;
    float acc = 0.f;
    for (int i = 0; i < d; ++i) {
        float xi = xb[i];
        if (col_scale) xi *= __half2float(col_scale[s0 + i]);
        acc += __half2float(Gg[i * d + k]) * xi;
    }
    u[(size_t)b * n + p] = acc;
}

// y[b, j] = r_j * (sum_p q[j, p] * u[b, p] - (2^BITS - 1) / 2 * usum[b]) + bias[j]
// one warp per (row j, batch row b); codes packed along the input dim, low bits first
template <int BITS>
__global__ void glvq_gemv(const float* __restrict__ u, const int* __restrict__ qcodes,
                          const __half* __restrict__ row_scale, const float* __restrict__ bias,
                          const float* __restrict__ usum, float* __restrict__ y,
                          int B, int n, int out, int words)
{
    constexpr int PER = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    int j = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    int b = blockIdx.y;
    if (j >= out || b >= B) return;   // whole warps exit together (blockDim is a multiple of 32)
    const int* row = qcodes + (size_t)j * words;
    const float* ub = u + (size_t)b * n;
    float acc = 0.f;
    for (int w = lane; w < words; w += 32) {
        unsigned q = (unsigned)row[w];
        int base = w * PER;
#pragma unroll
        for (int t = 0; t < PER; ++t) {
            int p = base + t;
            if (p < n) acc += (float)((q >> (BITS * t)) & MASK) * ub[p];
        }
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        float r = row_scale ? __half2float(row_scale[j]) : 1.f;
        float v = r * (acc - 0.5f * (float)((1 << BITS) - 1) * usum[b]);
        if (bias) v += bias[j];
        y[(size_t)b * out + j] = v;
    }
}
"""

_NAMES = ("glvq_transform",) + tuple(f"glvq_gemv<{b}>" for b in KERNEL_BITS)


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    """Compile once per device (lazily: importing this module does not import CuPy)."""
    import cupy as cp

    with cp.cuda.Device(device_id):
        mod = cp.RawModule(code=_SOURCE, options=COMPILE_OPTIONS, name_expressions=_NAMES)
        mod.compile()
    return mod


def lattice_matmul_cuda(x, dev):
    """``x @ dequantize(W).T + bias`` on the GPU. UNTESTED (see the module docstring).

    Parameters
    ----------
    x : (B, in) cupy.ndarray of float32
    dev : dict
        :func:`pack_lattice_layer` with its arrays moved to the device (``cupy.asarray``).
    """
    import cupy as cp

    B, n = x.shape
    out, words = dev["qcodes"].shape
    bits = dev["bits"]
    mod = _module(x.device.id)
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    u = cp.empty_like(x)
    t = LAUNCH["transform_threads"]
    null = lambda a: a if a is not None else cp.intp(0)  # noqa: E731 - nullptr for absent arrays
    mod.get_function("glvq_transform")(
        ((n + t - 1) // t, B), (t,),
        (x, dev["generators"], null(dev["col_scale"]), u, cp.int32(B), cp.int32(n), cp.int32(dev["d"]),
         cp.int32(dev["group_size"])))
    usum = u.sum(axis=1)
    y = cp.empty((B, out), dtype=cp.float32)
    wpb = LAUNCH["gemv_warps_per_block"]
    mod.get_function(f"glvq_gemv<{bits}>")(
        ((out + wpb - 1) // wpb, B), (32 * wpb,),
        (u, dev["qcodes"], null(dev["row_scale"]), null(dev["bias"]), usum, y, cp.int32(B), cp.int32(n),
         cp.int32(out), cp.int32(words)))
    return y

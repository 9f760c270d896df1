"""Launch sizes of the inference kernels, in one place (tests shrink them).

``LAUNCH[nb]`` configures the dequantize-GEMV/GEMM kernel for a batch tile of ``nb`` rows
(1, 2, 4, 8, 16): ``tx`` output columns per block (one per thread, so a warp reads 32
consecutive int32 words of one packed row: coalesced), ``ty`` threads splitting the
block's slice of the input dimension, ``kv`` input values per block (the slice of ``x``
staged in shared memory; the grid's y dimension is the split-K factor ``ceil(in / kv)``).
``kv`` must be a multiple of 32 (one 3-bit period). Shared memory per block is
``4 * (nb * kv + nb * kv / P + kv + ty * nb * tx)`` bytes, kept under the 48 KiB static limit.

``TRANSFORM_THREADS`` is the block size of the glvq transform (a power of two).

Kernels are compiled per launch size (the sizes are compile-time constants), so changing
an entry here recompiles on the next call.
"""

from __future__ import annotations

#: Batch tiles, smallest first: a batch of B rows runs with the smallest tile >= B.
BATCH_TILES = (1, 2, 4, 8, 16)

LAUNCH = {
    1: {"tx": 64, "ty": 8, "kv": 1024},
    2: {"tx": 64, "ty": 8, "kv": 1024},
    4: {"tx": 64, "ty": 4, "kv": 512},
    8: {"tx": 64, "ty": 4, "kv": 512},
    16: {"tx": 64, "ty": 4, "kv": 256},
}

#: Block size of the glvq transform kernel (power of two).
TRANSFORM_THREADS = {"threads": 256}

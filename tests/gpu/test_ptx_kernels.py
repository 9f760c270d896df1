"""Every inference kernel compiles to PTX for sm_80 and sm_90 with its launch signatures.

Marker ``ptx``: ``numba.cuda.compile_ptx`` (NVVM wheels, no GPU), in the ordinary test
process (the simulator has no compiler). Catches typing errors the simulator cannot (fp16
conversions, integer widths) and pins properties of the generated code.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ptx

numba_cuda = pytest.importorskip("numba.cuda")

from llm_adapter import kernels as K  # noqa: E402

CCS = [(8, 0), (9, 0)]


def _qmm_signature(xdt: str, ydt: str) -> str:
    # (x, qweight, scales, zeros, gidx, use_gidx, gsize, n_in, bias, has_bias, eparts, escale, n_eparts,
    #  part, counters, y) as _qmm_launch passes them (torch op: bias float32; glvq: x = u float32)
    return (f"void({xdt}[:, ::1], int32[:, ::1], float16[:, ::1], float16[:, ::1], int32[::1], int32, int32, "
            f"int32, float32[::1], int32, float32[:, ::1], float16[::1], int32, float32[:, :, ::1], int32[::1], "
            f"{ydt}[:, ::1])")


def _compile(kernel, sig, cc):
    from numba import cuda

    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    return ptx


# every bits for the three code shapes of the tiles: 1 (the prefetching GEMV; 2 is the same
# code with two rows), 4 (the loop without prefetch; 8 likewise) and 16 (the largest) on
# sm_90, and 1 and 16 on sm_80 -- compiling every tile takes minutes on a loaded 2-core box
_QMM_CASES = [((9, 0), b, nb) for b in K.KERNEL_BITS for nb in (1, 4, 16)] + [
    ((8, 0), b, nb) for b in K.KERNEL_BITS for nb in (1, 16)]


@pytest.mark.parametrize("cc, bits, nb", _QMM_CASES)
def test_qmm_kernel_compiles(cc, bits, nb):
    from llm_adapter.kernels._kernels import qmm_kernel

    cfg = K.LAUNCH[nb]
    ptx = _compile(qmm_kernel(bits, nb, cfg["tx"], cfg["ty"], cfg["kv"]), _qmm_signature("float16", "float16"), cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert "atom.global.add" in ptx  # the split-K counter
    assert "ld.local" not in ptx  # accumulators stay in registers
    assert "cvt.rn.f32.s32" not in ptx and "cvt.rn.f32.u32" not in ptx  # codes -> float by the exponent trick


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("nb", [1, 16])
def test_qmm_kernel_compiles_for_float32_activations(cc, nb):
    """float32 x: the glvq path (x = u) and bfloat16 converted at the torch boundary."""
    from llm_adapter.kernels._kernels import qmm_kernel

    cfg = K.LAUNCH[nb]
    for ydt in ("float32", "float16"):
        _compile(qmm_kernel(2, nb, cfg["tx"], cfg["ty"], cfg["kv"]), _qmm_signature("float32", ydt), cc)


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("xdt", ["float16", "float32"])
def test_glvq_transform_compiles(cc, xdt):
    from llm_adapter.kernels._kernels import transform_kernel

    sig = (f"void({xdt}[:, ::1], float16[:, :, ::1], float16[::1], int32, float32[::1], int32, int32, "
           "float32[:, ::1], float32[:, ::1])")
    ptx = _compile(transform_kernel(K.TRANSFORM_THREADS["threads"]), sig, cc)
    assert "bar.sync" in ptx  # the shared-memory reduction of the centre term


def test_launch_table_is_valid():
    """Every tile fits the 48 KiB static shared memory and kv holds whole 3-bit periods."""
    assert tuple(sorted(K.LAUNCH)) == K.BATCH_TILES
    for nb, cfg in K.LAUNCH.items():
        tx, ty, kv = cfg["tx"], cfg["ty"], cfg["kv"]
        assert kv % 32 == 0 and tx % 32 == 0 and tx * ty <= 1024
        worst = 4 * (nb * kv + nb * kv // 4 + kv + ty * nb * tx) + 4  # 8-bit: period 4
        assert worst <= 48 * 1024, (nb, worst)

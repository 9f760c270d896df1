"""Every CUDA source of the project compiles (NVRTC, no GPU needed) with the runtime's options.

This is not a substitute for running the kernels on a GPU (``make gpu-check``): it
catches syntax, type and template errors, and checks that the kernels the launchers look
up by name exist with the argument lists the launchers pass.
"""

import re

import pytest

from tests.nvrtc import NVRTCError, compile_ptx, find_nvrtc

pytestmark = pytest.mark.skipif(find_nvrtc() is None, reason="NVRTC wheels not installed (extra cuda-compile)")

#: Architectures the GPU code targets: A100 (sm_80) and H100 (sm_90).
ARCHS = ("compute_80", "compute_90")


def _entry_params(ptx: str, mangled: str) -> int:
    """Number of parameters of PTX entry ``mangled``."""
    m = re.search(r"\.entry\s+" + re.escape(mangled) + r"\s*\((.*?)\)", ptx, re.S)
    assert m, f"no .entry {mangled} in the PTX"
    return len(re.findall(r"\.param\s", m.group(1)))


@pytest.mark.parametrize("arch", ARCHS)
def test_lattice_kernel_compiles_with_the_runtime_options(arch):
    from llm_adapter import _lattice_kernel as lk

    ptx, lowered = compile_ptx(lk._SOURCE, lk._NAMES, arch=arch, options=lk.COMPILE_OPTIONS)
    assert set(lowered) == set(lk._NAMES)
    # argument counts of the launches in lattice_matmul_cuda
    assert _entry_params(ptx, lowered["glvq_transform"]) == 8
    for bits in lk.KERNEL_BITS:
        assert _entry_params(ptx, lowered[f"glvq_gemv<{bits}>"]) == 10
    assert "shfl.sync.down" in ptx  # the warp reduction is there


def test_harness_reports_compile_errors():
    with pytest.raises(NVRTCError, match="undefined"):
        compile_ptx("__global__ void k(float* y) { y[0] = undefined_thing; }", arch="compute_90")

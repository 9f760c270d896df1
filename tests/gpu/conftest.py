"""GPU tests, verified without a GPU (DESIGN.md §5).

Three kinds of test live here, told apart by a marker:

* ``kernel`` — runs numba-cuda kernels. They run under numba-cuda's CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1``, process-wide, so in its own pytest process: ``make gpu-sim``,
  which ``make test`` calls) or on a real CUDA device (``make gpu-check``); skipped otherwise.
* ``ptx`` — compiles kernels to PTX for sm_80/sm_90 with ``numba.cuda.compile_ptx`` (NVVM
  wheels, no GPU). Runs in the ordinary process; skipped under the simulator, which has no
  compiler.
* ``device`` — needs a real CUDA device (timings, CuPy/torch interop); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

#: True in the simulator's pytest process (``make gpu-sim``).
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")


def _has_device() -> bool:
    if SIMULATOR or importlib.util.find_spec("numba_cuda") is None and importlib.util.find_spec("numba") is None:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no driver, no libcuda
        return False


#: True when a real CUDA device is usable.
DEVICE = _has_device()


def pytest_configure(config):
    for name, text in (("kernel", "runs CUDA kernels (simulator or device)"),
                       ("ptx", "compiles kernels to PTX (no GPU, not under the simulator)"),
                       ("device", "needs a real CUDA device")):
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("kernel") and not (SIMULATOR or DEVICE):
            item.add_marker(pytest.mark.skip(reason="needs the CUDA simulator (make gpu-sim) or a CUDA device"))
        if item.get_closest_marker("ptx") and SIMULATOR:
            item.add_marker(pytest.mark.skip(reason="PTX compilation runs outside the simulator (make test)"))
        if item.get_closest_marker("device") and not DEVICE:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))

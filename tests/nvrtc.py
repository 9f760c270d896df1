"""Compile CUDA C++ to PTX with NVRTC on a machine without a GPU (ctypes, no CuPy).

NVRTC is a host library: it needs no driver and no device, so the CPU test suite can
check that every CUDA source of the project compiles for the target architectures, with
the options the runtime uses. Library and headers come from the PyPI wheels
``nvidia-cuda-nvrtc`` (``libnvrtc.so``) and ``nvidia-cuda-runtime`` (``cuda_fp16.h``),
installed by ``make test`` (extra ``cuda-compile``); :func:`find_nvrtc` returns ``None``
where they are missing and the tests skip.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path


def find_nvrtc():
    """``(libnvrtc path, CUDA include dir)`` from the ``nvidia`` wheels, or ``None``."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in map(Path, spec.submodule_search_locations):
        for cu in sorted(root.glob("cu*"), reverse=True):  # newest CUDA major first
            libs = sorted((cu / "lib").glob("libnvrtc.so*"))
            libs = [p for p in libs if "builtins" not in p.name]
            if libs and (cu / "include" / "cuda_fp16.h").is_file():
                return libs[0], cu / "include"
    return None


class NVRTCError(RuntimeError):
    """Compilation failed; the message holds NVRTC's log."""


def compile_ptx(source: str, name_expressions=(), *, arch: str = "compute_90", options=()):
    """Compile ``source``; returns ``(ptx text, {name expression: lowered (mangled) name})``."""
    found = find_nvrtc()
    if found is None:
        raise FileNotFoundError("NVRTC not found: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime")
    lib_path, include = found
    lib = ctypes.CDLL(str(lib_path))
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None), "create")
    try:
        for name in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, name.encode()), f"name expression {name!r}")
        opts = [f"--gpu-architecture={arch}".encode(), f"-I{include}".encode(), *(o.encode() for o in options)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise NVRTCError(f"NVRTC error {rc} ({arch}):\n{log.value.decode(errors='replace')}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "get PTX")
        lowered = {}
        for name in name_expressions:
            out = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), f"lowered {name!r}")
            lowered[name] = out.value.decode()
        return ptx.value.decode(), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check(lib, rc: int, what: str) -> None:
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NVRTCError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")

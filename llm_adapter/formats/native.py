"""The library's own on-disk format for quantized layers: one directory, written atomically.

Layout of a directory written by :func:`save_quantized`::

    quant_config.json        format name and version, library version, the spec,
                             the base model (source and config), per-layer metadata and stats
    quantized.safetensors    per layer ``<name>``:
                               <name>.qcodes  int32 (out, packed_length(in, bits))
                                              codes packed along the input dim (see packing)
                               <name>.scales  float32 or float16 (out, n_groups)
                               <name>.zeros   float32 (out, n_groups)
                               <name>.g_idx   int32 (in,)
                               <name>.bias    (out,)           if the layer has a bias
                               <name>.perm    int64 (in,)      if the layer has a perm
                             per glvq layer (:class:`~llm_adapter.lattice_method.LatticeLayer`,
                             ``"kind": "glvq"`` in its metadata; format version 2):
                               <name>.lcodes      int32 (out, packed_length(in, w)) code offsets
                                                  packed along the input dim, w = the smallest
                                                  packing width >= max(group_bits)
                               <name>.generators  float16 (n_groups, d, d)
                               <name>.group_bits  uint8 (n_groups,)
                               <name>.row_scale   float16 (out,)    if present
                               <name>.col_scale   float16 (in,)     if present
                               <name>.mu, .amax   float16 (n_groups,) µ-law compander, if present
                               <name>.bias        (out,)            if the layer has a bias

Only the quantized linear layers are stored; everything else (embeddings, norms, the
head) comes from the base model named in ``quant_config.json["model"]``. Codes are stored
packed in their original column order, so :meth:`QuantizedLayer.dequantize` of a loaded
layer equals that of the saved one exactly (with ``scale_dtype="float16"``: up to the
fp16 rounding of the scales); a loaded glvq layer equals the saved one exactly.

Version 1 directories (uniform layers only) are read as well; a directory is written as
version 2 only when it holds a glvq layer, so readers of version 1 keep reading the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..lattice_method import LatticeLayer
from ..quantized import QuantizedLayer
from .packing import SUPPORTED_BITS, pack, pack_width, packed_length, unpack

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "QuantizedFormatError",
    "TENSORS_NAME",
    "load_quantized",
    "save_quantized",
]

FORMAT_NAME = "bils-quantized"
#: Newest format version written (used only when a directory holds glvq layers; else 1).
FORMAT_VERSION = 2
#: Versions :func:`load_quantized` reads (1: uniform layers only; 2: adds glvq layers).
READ_VERSIONS = (1, 2)
CONFIG_NAME = "quant_config.json"
TENSORS_NAME = "quantized.safetensors"

logger = logging.getLogger(__name__)

_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


class QuantizedFormatError(ValueError):
    """A quantized directory (or the layers given to save) is malformed.

    A :class:`ValueError`; the message names the file or layer and the field.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from llm_adapter.quantized import QuantizedLayer
    >>> bad = QuantizedLayer(codes=np.zeros((2, 8), np.uint8), scales=np.ones((2, 1), np.float32),
    ...                      zeros=np.zeros((2, 1), np.float32), g_idx=np.zeros(4, np.int32),
    ...                      bits=4, group_size=-1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_quantized(f"{tmp}/out", {"fc": bad})
    Traceback (most recent call last):
        ...
    llm_adapter.formats.native.QuantizedFormatError: layer 'fc': `g_idx` must be an integer array of shape (8,), got int32 (4,)
    """


# --------------------------------------------------------------------------- save


def save_quantized(
    path: str | os.PathLike,
    layers: dict[str, QuantizedLayer],
    spec_dict: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    *,
    scale_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write quantized layers to directory `path`, atomically.

    The files are written into a fresh temporary directory next to `path`, flushed to
    disk (``fsync``), and the directory is renamed into place with :func:`os.replace`;
    on any failure the temporary directory is removed and `path` is left as it was.

    Parameters
    ----------
    path : str or path-like
        The directory to create.
    layers : dict of str to QuantizedLayer or LatticeLayer
        Module name (``"model.layers.0.self_attn.q_proj"``) to its quantized layer
        (uniform :class:`~llm_adapter.quantized.QuantizedLayer` or glvq
        :class:`~llm_adapter.lattice_method.LatticeLayer`; both may be mixed).
    spec_dict : dict, optional
        The quantization spec, JSON-serialisable (stored as is under ``"spec"``).
    model_info : dict, optional
        The base model: ``{"source": <what load_model was given>, "config": {...}}``
        and anything else JSON-serialisable (stored under ``"model"``).
    scale_dtype : {"float32", "float16"}
        Storage dtype of the scales. ``"float32"`` is lossless.
    overwrite : bool
        Replace an existing directory at `path` (the old one is removed only after the
        new one is complete). Otherwise an existing `path` is an error.

    Returns
    -------
    pathlib.Path
        `path`.

    Raises
    ------
    QuantizedFormatError
        If a layer is malformed (the message names the layer and the field).
    FileExistsError
        If `path` exists and `overwrite` is false.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.quantized import QuantizedLayer
    >>> rng = np.random.default_rng(0)
    >>> q = QuantizedLayer(codes=rng.integers(0, 16, (8, 32)).astype(np.uint8),
    ...                    scales=np.full((8, 1), 0.1, np.float32),
    ...                    zeros=np.full((8, 1), 8.0, np.float32),
    ...                    g_idx=np.zeros(32, np.int32), bits=4, group_size=-1)
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save_quantized(pathlib.Path(tmp.name) / "quantized", {"model.fc": q},
    ...                       {"bits": 4, "method": "rtn"}, {"source": "my-model"})
    >>> sorted(p.name for p in path.iterdir())
    ['quant_config.json', 'quantized.safetensors']
    >>> save_quantized(path, {"model.fc": q})
    Traceback (most recent call last):
        ...
    FileExistsError: ...already exists; pass overwrite=True to replace it
    >>> tmp.cleanup()
    """
    from safetensors.numpy import save_file

    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"`scale_dtype` must be one of {sorted(_SCALE_DTYPES)}, got {scale_dtype!r}")
    if not isinstance(layers, dict) or not layers:
        raise QuantizedFormatError("`layers` must be a non-empty dict of name -> QuantizedLayer")
    target = Path(os.fspath(path))
    if target.exists() and not overwrite:
        raise FileExistsError(f"`path` {str(target)!r} already exists; pass overwrite=True to replace it")

    tensors: dict[str, np.ndarray] = {}
    layer_meta: dict[str, Any] = {}
    for name, layer in layers.items():
        if isinstance(layer, LatticeLayer):
            layer_meta[name] = _lattice_tensors(name, layer, tensors)
            continue
        _check_layer(name, layer)
        out_f, in_f = layer.shape
        tensors[f"{name}.qcodes"] = pack(layer.codes, layer.bits, axis=1)
        tensors[f"{name}.scales"] = np.ascontiguousarray(layer.scales, dtype=_SCALE_DTYPES[scale_dtype])
        tensors[f"{name}.zeros"] = np.ascontiguousarray(layer.zeros, dtype=np.float32)
        tensors[f"{name}.g_idx"] = np.ascontiguousarray(layer.g_idx, dtype=np.int32)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = np.ascontiguousarray(layer.bias)
        if layer.perm is not None:
            tensors[f"{name}.perm"] = np.ascontiguousarray(layer.perm, dtype=np.int64)
        layer_meta[name] = {
            "bits": int(layer.bits),
            "group_size": int(layer.group_size),
            "out_features": int(out_f),
            "in_features": int(in_f),
            "n_groups": int(layer.scales.shape[1]),
            "bias": layer.bias is not None,
            "perm": layer.perm is not None,
            "stats": _jsonable(layer.stats),
        }

    lattice = any(m.get("kind") == "glvq" for m in layer_meta.values())
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if lattice else 1,
        "library": {"name": "bils", "version": _library_version()},
        "scale_dtype": scale_dtype,
        "spec": _jsonable(spec_dict or {}),
        "model": _jsonable(model_info or {}),
        "bits": sorted({b for m in layer_meta.values() for b in _as_list(m["bits"])}),
        "layers": layer_meta,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT_NAME})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")

    return write_dir_atomically(target, fill, overwrite=overwrite)


def write_dir_atomically(target: Path, fill, *, overwrite: bool = False) -> Path:
    """Create directory `target` by ``fill(tmp)`` on a temporary directory in the same
    parent, fsync every file and the directory, then :func:`os.replace` it into place.

    On any exception from `fill` or the flush, the temporary directory is removed and
    `target` is untouched. With `overwrite`, an existing `target` is first moved aside
    (same parent) and removed once the new directory is in place; if the final rename
    fails, it is moved back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    keep_old = False
    try:
        fill(tmp)
        for item in tmp.iterdir():
            if item.is_file():
                _fsync_path(item)
        _fsync_path(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{str(target)!r} appeared while it was being written")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "dir")
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                try:
                    os.replace(old / "dir", target)
                except OSError:
                    keep_old = True  # never delete the only copy of the previous directory
                    logger.error("could not move %s back to %s; the previous contents are kept there",
                                 old / "dir", target)
            raise
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not keep_old:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- load


def load_quantized(path: str | os.PathLike) -> tuple[dict[str, QuantizedLayer], dict[str, Any]]:
    """Read a directory written by :func:`save_quantized`.

    Parameters
    ----------
    path : str or path-like
        The directory.

    Returns
    -------
    layers : dict of str to QuantizedLayer or LatticeLayer
        In the order they were saved; scales are float32 (converted from float16 if
        stored so), zeros float32, codes uint8. glvq layers come back as
        :class:`~llm_adapter.lattice_method.LatticeLayer` with their stored dtypes.
    meta : dict
        The parsed ``quant_config.json`` (``spec``, ``model``, ``library``, ``layers``...).

    Raises
    ------
    FileNotFoundError
        If `path` is not a directory or lacks one of the two files.
    QuantizedFormatError
        If the files are not in this format, of an unsupported version, or inconsistent;
        the message names the file, the layer and the field.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.quantized import QuantizedLayer
    >>> rng = np.random.default_rng(0)
    >>> q = QuantizedLayer(codes=rng.integers(0, 16, (8, 32)).astype(np.uint8),
    ...                    scales=np.full((8, 1), 0.1, np.float32),
    ...                    zeros=np.full((8, 1), 8.0, np.float32),
    ...                    g_idx=np.zeros(32, np.int32), bits=4, group_size=-1)
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save_quantized(pathlib.Path(tmp.name) / "quantized", {"model.fc": q},
    ...                       {"bits": 4, "method": "rtn"})
    >>> layers, meta = load_quantized(path)
    >>> list(layers), meta["format"], meta["spec"]
    (['model.fc'], 'bils-quantized', {'bits': 4, 'method': 'rtn'})
    >>> bool(np.array_equal(layers["model.fc"].dequantize(), q.dequantize()))
    True
    >>> tmp.cleanup()
    """
    from safetensors import safe_open

    root = Path(os.fspath(path))
    if not root.is_dir():
        raise FileNotFoundError(f"quantized directory {str(root)!r} does not exist")
    cfg_path, st_path = root / CONFIG_NAME, root / TENSORS_NAME
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a quantized directory: missing {p.name}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise QuantizedFormatError(f"{CONFIG_NAME} in {str(root)!r} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise QuantizedFormatError(
            f"{CONFIG_NAME}: `format` must be {FORMAT_NAME!r}, got "
            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}"
        )
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise QuantizedFormatError(
            f"{CONFIG_NAME}: `format_version` {version!r} is not supported (this library reads "
            f"versions {list(READ_VERSIONS)}); re-quantize or upgrade bils"
        )
    layer_meta = meta.get("layers")
    if not isinstance(layer_meta, dict) or not layer_meta:
        raise QuantizedFormatError(f"{CONFIG_NAME}: `layers` must be a non-empty object")

    layers: dict[str, QuantizedLayer] = {}
    try:
        handle = safe_open(str(st_path), framework="numpy")
    except Exception as err:  # safetensors raises its own error types
        raise QuantizedFormatError(f"{TENSORS_NAME} in {str(root)!r} cannot be read: {err}") from err
    with handle as f:
        keys = set(f.keys())

        def get(name: str, field: str, required: bool = True):
            key = f"{name}.{field}"
            if key not in keys:
                if required:
                    raise QuantizedFormatError(f"{TENSORS_NAME}: layer {name!r} has no tensor `{field}`")
                return None
            return f.get_tensor(key)

        for name, m in layer_meta.items():
            if isinstance(m, dict) and m.get("kind", "uniform") == "glvq":
                layers[name] = _lattice_layer(name, m, get)
                continue
            try:
                bits, gs = int(m["bits"]), int(m["group_size"])
                out_f, in_f, n_groups = int(m["out_features"]), int(m["in_features"]), int(m["n_groups"])
            except (KeyError, TypeError, ValueError) as err:
                raise QuantizedFormatError(
                    f"{CONFIG_NAME}: layer {name!r} metadata is missing or has a bad field: {err}"
                ) from err
            if bits not in SUPPORTED_BITS:
                raise QuantizedFormatError(f"{CONFIG_NAME}: layer {name!r} `bits` must be one of {SUPPORTED_BITS}, got {bits}")
            qcodes = get(name, "qcodes")
            want = (out_f, packed_length(in_f, bits))
            if qcodes.dtype != np.int32 or qcodes.shape != want:
                raise QuantizedFormatError(
                    f"{TENSORS_NAME}: layer {name!r} `qcodes` must be int32 {want}, got "
                    f"{qcodes.dtype} {qcodes.shape}"
                )
            scales = get(name, "scales")
            zeros = get(name, "zeros")
            for field, arr in (("scales", scales), ("zeros", zeros)):
                if arr.shape != (out_f, n_groups) or arr.dtype.kind != "f":
                    raise QuantizedFormatError(
                        f"{TENSORS_NAME}: layer {name!r} `{field}` must be float ({out_f}, {n_groups}), "
                        f"got {arr.dtype} {arr.shape}"
                    )
            g_idx = get(name, "g_idx")
            if g_idx.shape != (in_f,) or g_idx.dtype.kind not in "iu":
                raise QuantizedFormatError(
                    f"{TENSORS_NAME}: layer {name!r} `g_idx` must be integer ({in_f},), got {g_idx.dtype} {g_idx.shape}"
                )
            bias = get(name, "bias", required=bool(m.get("bias")))
            perm = get(name, "perm", required=bool(m.get("perm")))
            layer = QuantizedLayer(
                codes=unpack(qcodes, bits, in_f, axis=1),
                scales=scales.astype(np.float32),
                zeros=zeros.astype(np.float32),
                g_idx=g_idx.astype(np.int32),
                bits=bits,
                group_size=gs,
                perm=perm,
                bias=bias,
                stats=dict(m.get("stats") or {}),
            )
            _check_layer(name, layer, where=f"{TENSORS_NAME}: ")
            layers[name] = layer
        extra = sorted(k for k in keys if k.rsplit(".", 1)[0] not in layer_meta)
        if extra:
            raise QuantizedFormatError(
                f"{TENSORS_NAME} has tensors of layers not listed in {CONFIG_NAME}: {extra[:5]}"
            )
    return layers, meta


# --------------------------------------------------------------------------- glvq layers
#: Optional fp16 arrays of a glvq layer, stored when present.
_LATTICE_OPTIONAL = ("row_scale", "col_scale", "mu", "amax")


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _lattice_tensors(name: str, layer, tensors: dict) -> dict:
    """Add the tensors of glvq layer `name` to `tensors`; return its metadata entry."""
    def bad(msg: str):
        raise QuantizedFormatError(f"layer {name!r}: {msg}")

    codes = np.asarray(layer.codes)
    gb = np.asarray(layer.group_bits)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        bad(f"`codes` must be a 2-D integer array, got {codes.dtype} with shape {codes.shape}")
    if gb.size == 0 or gb.min() < 1:
        bad("`group_bits` must be positive")
    out_f, in_f = codes.shape
    for g in range(layer.n_groups):
        a, b = layer.group_bounds(g)
        blk = codes[:, a:b]
        if blk.size and (blk.min() < 0 or blk.max() >= 1 << int(gb[g])):
            bad(f"`codes` of group {g} must lie in [0, {(1 << int(gb[g])) - 1}] (group_bits {int(gb[g])})")
    if not np.all(np.isfinite(np.asarray(layer.generators, dtype=np.float64))):
        bad("`generators` has non-finite entries")
    try:
        width = pack_width(int(gb.max()))
    except ValueError as err:
        bad(f"`group_bits`: {err}")
    tensors[f"{name}.lcodes"] = pack(codes, width, axis=1)
    tensors[f"{name}.generators"] = np.ascontiguousarray(layer.generators, dtype=np.float16)
    tensors[f"{name}.group_bits"] = np.ascontiguousarray(gb, dtype=np.uint8)
    for field in _LATTICE_OPTIONAL:
        v = getattr(layer, field)
        if v is not None:
            tensors[f"{name}.{field}"] = np.ascontiguousarray(v, dtype=np.float16)
    if layer.bias is not None:
        tensors[f"{name}.bias"] = np.ascontiguousarray(layer.bias)
    return {
        "kind": "glvq",
        "bits": sorted({int(b) for b in gb}),
        "pack_bits": width,
        "d": int(layer.d),
        "group_size": int(layer.group_size),
        "offset": float(layer.offset),
        "out_features": int(out_f),
        "in_features": int(in_f),
        "n_groups": int(layer.n_groups),
        "bias": layer.bias is not None,
        "optional": [f for f in _LATTICE_OPTIONAL if getattr(layer, f) is not None],
        "bits_per_weight": float(layer.bits_per_weight),
        "stats": _jsonable(layer.stats),
    }


def _lattice_layer(name: str, m: dict, get):
    """Rebuild glvq layer `name` from its metadata `m` and tensor getter `get`."""
    try:
        width, d, gs = int(m["pack_bits"]), int(m["d"]), int(m["group_size"])
        out_f, in_f, n_groups = int(m["out_features"]), int(m["in_features"]), int(m["n_groups"])
        offset, optional = float(m["offset"]), list(m.get("optional") or [])
    except (KeyError, TypeError, ValueError) as err:
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} metadata is missing or has a bad field: {err}") from err
    if width not in SUPPORTED_BITS:
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} `pack_bits` must be one of {SUPPORTED_BITS}, got {width}")
    lcodes = get(name, "lcodes")
    want = (out_f, packed_length(in_f, width))
    if lcodes.dtype != np.int32 or lcodes.shape != want:
        raise QuantizedFormatError(f"{TENSORS_NAME}: layer {name!r} `lcodes` must be int32 {want}, got "
                                   f"{lcodes.dtype} {lcodes.shape}")
    arrays = {"generators": get(name, "generators"), "group_bits": get(name, "group_bits")}
    for field in optional:
        if field not in _LATTICE_OPTIONAL:
            raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} names an unknown tensor {field!r}")
        arrays[field] = get(name, field)
    try:
        layer = LatticeLayer(codes=unpack(lcodes, width, in_f, axis=1), d=d, group_size=gs, offset=offset,
                             bias=get(name, "bias", required=bool(m.get("bias"))),
                             stats=dict(m.get("stats") or {}), **arrays)
    except ValueError as err:
        raise QuantizedFormatError(f"{TENSORS_NAME}: glvq layer {name!r}: {err}") from err
    if layer.n_groups != n_groups:
        raise QuantizedFormatError(f"{CONFIG_NAME}: glvq layer {name!r} `n_groups` {n_groups} does not match "
                                   f"its tensors ({layer.n_groups})")
    return layer


# --------------------------------------------------------------------------- checks


def check_layer(name: str, layer: QuantizedLayer) -> None:
    """Raise :class:`QuantizedFormatError` naming `name` and the field if `layer` is
    inconsistent (shapes, dtypes, code range, group indices, scales)."""
    _check_layer(name, layer)


def _check_layer(name: str, layer: QuantizedLayer, where: str = "") -> None:
    def bad(msg: str):
        raise QuantizedFormatError(f"{where}layer {name!r}: {msg}")

    if not isinstance(layer, QuantizedLayer):
        bad(f"must be a QuantizedLayer, got {type(layer).__name__}")
    if layer.bits not in SUPPORTED_BITS:
        bad(f"`bits` must be one of {SUPPORTED_BITS}, got {layer.bits!r}")
    codes = np.asarray(layer.codes)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        bad(f"`codes` must be a 2-D integer array, got {codes.dtype} with shape {codes.shape}")
    out_f, in_f = codes.shape
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << layer.bits):
        bad(f"`codes` must lie in [0, {(1 << layer.bits) - 1}] for bits={layer.bits}")
    gs = layer.group_size
    if not isinstance(gs, (int, np.integer)) or (gs != -1 and gs < 1):
        bad(f"`group_size` must be -1 (per-channel) or a positive int, got {gs!r}")
    g_idx = np.asarray(layer.g_idx)
    if g_idx.shape != (in_f,) or g_idx.dtype.kind not in "iu":
        bad(f"`g_idx` must be an integer array of shape ({in_f},), got {g_idx.dtype} {g_idx.shape}")
    scales, zeros = np.asarray(layer.scales), np.asarray(layer.zeros)
    if scales.ndim != 2 or scales.shape[0] != out_f:
        bad(f"`scales` must have shape ({out_f}, n_groups), got {scales.shape}")
    n_groups = scales.shape[1]
    if zeros.shape != scales.shape:
        bad(f"`zeros` must have the shape of `scales` {scales.shape}, got {zeros.shape}")
    if in_f and (g_idx.min() < 0 or g_idx.max() >= n_groups):
        bad(f"`g_idx` must lie in [0, {n_groups - 1}] (n_groups = scales.shape[1])")
    if not np.all(np.isfinite(scales)):
        bad("`scales` has non-finite entries")
    if not np.all(np.isfinite(zeros)):
        bad("`zeros` has non-finite entries")
    if layer.bias is not None and np.asarray(layer.bias).shape != (out_f,):
        bad(f"`bias` must have shape ({out_f},), got {np.asarray(layer.bias).shape}")
    if layer.perm is not None and np.asarray(layer.perm).shape != (in_f,):
        bad(f"`perm` must have shape ({in_f},), got {np.asarray(layer.perm).shape}")


def _jsonable(obj):
    """Convert numpy scalars/arrays and tuples so `json.dumps` accepts `obj`."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return str(obj)


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("bils")
    except Exception:  # not installed (source checkout)
        try:
            import bils

            return getattr(bils, "__version__", "unknown")
        except ImportError:
            return "unknown"

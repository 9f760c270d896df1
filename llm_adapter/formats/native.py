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
                             per glvq layer (:class:`~llm_adapter.methods.glvq.LatticeLayer`,
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
import os
from pathlib import Path
from typing import Any

from .. import methods
from ..errors import QuantizedFormatError
from ._io import jsonable, write_dir_atomically

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

_SCALE_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------- save


def save_quantized(
    path: str | os.PathLike,
    layers: dict[str, Any],
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
        (uniform :class:`~llm_adapter.methods.uniform.QuantizedLayer` or glvq
        :class:`~llm_adapter.methods.glvq.LatticeLayer`; both may be mixed).
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
    >>> from llm_adapter.methods.uniform import QuantizedLayer
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

    tensors: dict = {}
    layer_meta: dict[str, Any] = {}
    version = 1
    for name, layer in layers.items():
        try:
            fmt = methods.for_layer(layer).format
        except TypeError as err:
            raise QuantizedFormatError(f"layer {name!r}: {err}") from None
        meta = fmt.write(name, layer, tensors, scale_dtype=scale_dtype)
        if fmt.kind != "uniform":
            meta = {"kind": fmt.kind, **meta}
        layer_meta[name] = meta
        version = max(version, fmt.format_version)

    config = {
        "format": FORMAT_NAME,
        "format_version": version,
        "library": {"name": "bils", "version": library_version()},
        "scale_dtype": scale_dtype,
        "spec": jsonable(spec_dict or {}),
        "model": jsonable(model_info or {}),
        "bits": sorted({b for m in layer_meta.values() for b in _as_list(m["bits"])}),
        "layers": layer_meta,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT_NAME})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")

    return write_dir_atomically(target, fill, on_exists="replace" if overwrite else "error")


# --------------------------------------------------------------------------- load


def load_quantized(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
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
        :class:`~llm_adapter.methods.glvq.LatticeLayer` with their stored dtypes.
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
    >>> from llm_adapter.methods.uniform import QuantizedLayer
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

    layers: dict[str, Any] = {}
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
            kind = m.get("kind", "uniform") if isinstance(m, dict) else "uniform"
            try:
                fmt = methods.for_kind(kind).format
            except KeyError:
                raise QuantizedFormatError(f"{CONFIG_NAME}: layer {name!r} has unknown `kind` {kind!r}") from None
            if not isinstance(m, dict):
                raise QuantizedFormatError(f"{CONFIG_NAME}: layer {name!r} metadata must be an object")
            layers[name] = fmt.read(name, m, get)
        extra = sorted(k for k in keys if k.rsplit(".", 1)[0] not in layer_meta)
        if extra:
            raise QuantizedFormatError(
                f"{TENSORS_NAME} has tensors of layers not listed in {CONFIG_NAME}: {extra[:5]}"
            )
    return layers, meta


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def library_version() -> str:
    """Version of the installed ``bils`` distribution (``"unknown"`` in a bare checkout)."""
    try:
        from importlib.metadata import version

        return version("bils")
    except Exception:  # not installed (source checkout)
        try:
            import bils

            return getattr(bils, "__version__", "unknown")
        except ImportError:
            return "unknown"

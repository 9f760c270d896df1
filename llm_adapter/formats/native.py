"""The library's own on-disk format for quantized layers: one directory, written atomically.

Layout of a directory written by :func:`save_quantized`::

    quant_config.json        format name and version, library version, the spec,
                             the base model (source and config), per-layer metadata and stats,
                             ``checksums``: {"algorithm": "sha256", "config": <digest of this
                             file's other keys>, "tensors": {<tensor name>: <digest>}}
                             (the config digest is repeated in the tensors file's header
                             metadata, ``bils.config_sha256``: damage to one file cannot
                             switch the check off)
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

Integrity: every tensor's SHA-256 (over dtype, shape and bytes) and the SHA-256 of the
canonical JSON of the rest of ``quant_config.json`` are written and verified on load, so a
corrupt or edited file is a :class:`QuantizedFormatError` naming the file and the tensor,
never different weights. Each layer is also checked for meaning (scales positive and
finite, zero points integers in ``[0, 2**bits - 1]``, ``g_idx`` a valid group map, codes in
range, shapes consistent). Directories written before checksums existed (no
``checksums`` key; readers of those versions ignore it, so the format version is
unchanged) still load, with an :class:`~llm_adapter.errors.IntegrityWarning` that the
check was skipped. Every decoding error (bytes that are not UTF-8, bad JSON, a damaged
safetensors header) is a :class:`QuantizedFormatError` naming the file.

Version 1 directories (uniform layers only) are read as well; a directory is written as
version 2 only when it holds a glvq layer, so readers of version 1 keep reading the rest.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from .. import methods
from ..errors import IntegrityWarning, QuantizedFormatError
from ._integrity import ALGORITHM, json_digest, tensor_digest
from ._io import jsonable, write_dir_atomically

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "QuantizedFormatError",
    "TENSORS_NAME",
    "load_quantized",
    "read_json",
    "save_quantized",
]

FORMAT_NAME = "bils-quantized"
#: Newest format version written (used only when a directory holds glvq layers; else 1).
FORMAT_VERSION = 2
#: Versions :func:`load_quantized` reads (1: uniform layers only; 2: adds glvq layers).
READ_VERSIONS = (1, 2)
CONFIG_NAME = "quant_config.json"
TENSORS_NAME = "quantized.safetensors"
#: Key of the safetensors header metadata repeating quant_config.json's own checksum.
CONFIG_SHA_KEY = "bils.config_sha256"

_SCALE_DTYPES = ("float32", "float16")

logger = logging.getLogger(__name__)


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
    BusyError
        If another thread or process is writing `path` (:func:`~llm_adapter.formats._io.claim_dir`).

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
    config["checksums"] = {
        "algorithm": ALGORITHM,
        "config": json_digest(config),
        "tensors": {key: tensor_digest(v) for key, v in sorted(tensors.items())},
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS_NAME),
                  metadata={"format": FORMAT_NAME, CONFIG_SHA_KEY: config["checksums"]["config"]})
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
    meta = read_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise QuantizedFormatError(
            f"{cfg_path}: `format` must be {FORMAT_NAME!r}, got "
            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}"
        )
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise QuantizedFormatError(
            f"{cfg_path}: `format_version` {version!r} is not supported (this library reads "
            f"versions {list(READ_VERSIONS)}); re-quantize or upgrade bils"
        )
    layer_meta = meta.get("layers")
    if not isinstance(layer_meta, dict) or not layer_meta:
        raise QuantizedFormatError(f"{cfg_path}: `layers` must be a non-empty object")

    layers: dict[str, Any] = {}
    try:
        handle = safe_open(str(st_path), framework="numpy")
    except Exception as err:  # safetensors raises its own error types
        raise QuantizedFormatError(f"{st_path} cannot be read: {err}") from err
    with handle as f:
        try:
            keys = set(f.keys())
            header = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - a corrupt header
            raise QuantizedFormatError(f"{st_path}: cannot list the tensors: {err}") from err
        digests = _check_config_digest(cfg_path, st_path, meta, header.get(CONFIG_SHA_KEY))
        if digests is not None and keys != set(digests):
            missing, extra = sorted(set(digests) - keys), sorted(keys - set(digests))
            raise QuantizedFormatError(
                f"{st_path}: the tensors differ from those recorded in {CONFIG_NAME} "
                f"(missing {missing[:5]}, not recorded {extra[:5]}); the file is corrupt or was replaced"
            )

        def get(name: str, field: str, required: bool = True):
            key = f"{name}.{field}"
            if key not in keys:
                if required:
                    raise QuantizedFormatError(f"{st_path}: layer {name!r} has no tensor `{field}`")
                return None
            try:
                arr = f.get_tensor(key)
            except Exception as err:  # noqa: BLE001 - safetensors' own error types
                raise QuantizedFormatError(f"{st_path}: tensor `{key}` cannot be read: {err}") from err
            if digests is not None and tensor_digest(arr) != digests[key]:
                raise QuantizedFormatError(
                    f"{st_path}: tensor `{key}` does not match its SHA-256 checksum in {CONFIG_NAME} "
                    "(the file is corrupt or was modified)"
                )
            return arr

        for name, m in layer_meta.items():
            kind = m.get("kind", "uniform") if isinstance(m, dict) else "uniform"
            try:
                fmt = methods.for_kind(kind).format
            except (KeyError, TypeError):
                raise QuantizedFormatError(f"{cfg_path}: layer {name!r} has unknown `kind` {kind!r}") from None
            if not isinstance(m, dict):
                raise QuantizedFormatError(f"{cfg_path}: layer {name!r} metadata must be an object")
            try:
                layers[name] = fmt.read(name, m, get)
            except QuantizedFormatError:
                raise
            except Exception as err:  # noqa: BLE001 - anything else a malformed entry causes
                raise QuantizedFormatError(
                    f"{root}: layer {name!r} cannot be decoded from {CONFIG_NAME} / {TENSORS_NAME}: "
                    f"{type(err).__name__}: {err}"
                ) from err
        extra = sorted(k for k in keys if k.rsplit(".", 1)[0] not in layer_meta)
        if extra:
            raise QuantizedFormatError(
                f"{st_path} has tensors of layers not listed in {CONFIG_NAME}: {extra[:5]}"
            )
    return layers, meta


def read_json(path) -> Any:
    """Parse JSON file `path`; any decoding error becomes a :class:`QuantizedFormatError`
    naming the file (and the byte or line and column)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise QuantizedFormatError(f"{path} cannot be read: {err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise QuantizedFormatError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise QuantizedFormatError(f"{path} is not valid JSON: {err}") from err


def _check_config_digest(cfg_path: Path, st_path: Path, meta: dict, recorded: str | None) -> dict | None:
    """Verify ``meta["checksums"]["config"]`` (also recorded as `recorded` in the tensors
    file's header, so damage to either file cannot switch the check off); return the
    tensor digests (None: a file written before checksums, unchecked)."""
    sums = meta.get("checksums")
    if (sums is None) != (recorded is None):
        has, lacks = (cfg_path, st_path) if recorded is None else (st_path, cfg_path)
        raise QuantizedFormatError(f"{has} records checksums but {lacks} does not: one of the files is "
                                   "corrupt or was replaced")
    if sums is None:
        msg = (f"{cfg_path} has no checksums (written before bils added them); loading it without "
               "an integrity check. Re-save it to add them")
        warnings.warn(msg, IntegrityWarning, stacklevel=3)
        logger.warning("%s", msg)
        return None
    tensors = sums.get("tensors") if isinstance(sums, dict) else None
    if (not isinstance(sums, dict) or sums.get("algorithm") != ALGORITHM or not isinstance(sums.get("config"), str)
            or not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values())):
        raise QuantizedFormatError(f"{cfg_path}: `checksums` must be {{'algorithm': {ALGORITHM!r}, 'config': hex, "
                                   "'tensors': {name: hex}}")
    try:
        ok = json_digest({k: v for k, v in meta.items() if k != "checksums"}) == sums["config"]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise QuantizedFormatError(f"{cfg_path}: the content does not match its SHA-256 checksum "
                                   "(the file is corrupt or was edited)")
    if recorded != sums["config"]:
        raise QuantizedFormatError(f"{st_path}: its header's checksum of {CONFIG_NAME} differs from the one "
                                   f"{CONFIG_NAME} records; one of the files is corrupt or was replaced")
    return tensors


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

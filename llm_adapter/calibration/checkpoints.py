"""Per-layer checkpoints of a calibration run: one file per finished layer + a manifest.

A layer file holds the layer's :meth:`to_arrays` and its JSON :meth:`metadata` (with the
stored-format ``format`` kind, which picks the layer type from the method registry on
load): an ``.npz`` with a ``meta`` byte array, or a ``.safetensors`` file with the JSON in
its header. Every file is written atomically (:mod:`llm_adapter.formats._io`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import methods
from ..errors import ParameterError
from ..formats._io import jsonable, write_file_atomically

__all__ = ["check_manifest", "layer_path", "load_layer", "save_layer"]


def layer_path(directory, name: str) -> Path:
    """The checkpoint file of layer `name` in `directory`."""
    return Path(directory) / f"{name}.npz"


def save_layer(path, layer) -> Path:
    """Write `layer` (of any registered method) to `path` atomically.

    Parameters
    ----------
    path : str or path-like
        The file (its directory must exist; an existing file is replaced). A
        ``.safetensors`` suffix selects safetensors, anything else ``.npz``.
    layer : QuantizedLayer, LatticeLayer, ...
        Its arrays, ``metadata()`` and ``stats`` (JSON-safe) are stored.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from llm_adapter.methods.uniform import QuantSpec, quantize_weight
    >>> W = np.random.default_rng(0).standard_normal((8, 16))
    >>> q = quantize_weight(W, spec=QuantSpec(bits=4, method="rtn"))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> r = load_layer(save_layer(pathlib.Path(tmp.name) / "fc.npz", q))
    >>> r.shape, r.bits, r.group_size, bool(np.array_equal(r.codes, q.codes)), r.stats["method"]
    ((8, 16), 4, -1, True, 'rtn')
    >>> tmp.cleanup()
    """
    path = Path(path)
    kind = methods.for_layer(layer).format.kind
    arrays = {k: np.ascontiguousarray(v) for k, v in layer.to_arrays().items()}
    meta = json.dumps(jsonable({"format": kind, **layer.metadata()}))
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        blob = save(arrays, metadata={"layer": meta})
        return write_file_atomically(path, lambda f: f.write(blob))
    return write_file_atomically(
        path, lambda f: np.savez(f, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays))


def load_layer(path):
    """Read a layer written by :func:`save_layer` (or by the earlier per-method writers).

    Raises
    ------
    ValueError
        If the file's ``format`` kind belongs to no registered method.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            meta = json.loads(header.get("layer") or header["glvq"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    else:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k != "meta"}
    kind = meta.get("format", "uniform")  # uniform checkpoints of earlier versions carry no kind
    try:
        layer_type = methods.for_kind(kind).layer_type
    except KeyError:
        raise ValueError(f"{str(path)!r} holds a layer of kind {kind!r}, which no registered method reads") from None
    return layer_type.from_arrays(arrays, meta)


def check_manifest(directory, manifest: dict) -> None:
    """Create `directory` with ``manifest.json`` = `manifest`, or check that the one there
    is equal (a resumed run must use the same settings)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            raise ParameterError("checkpoint_dir",
                                 f"`checkpoint_dir` {str(directory)!r} holds a run with different settings: "
                                 f"{old} != {manifest}; use another directory or delete it")
        return
    text = json.dumps(manifest, indent=1, sort_keys=True)
    write_file_atomically(path, lambda f: f.write(text), binary=False)

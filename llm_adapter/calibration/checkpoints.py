"""Per-layer checkpoints of a calibration run: one file per finished layer + a manifest.

A layer file holds the layer's :meth:`to_arrays` and its JSON :meth:`metadata` (with the
stored-format ``format`` kind, which picks the layer type from the method registry on
load, and the SHA-256 of every array): an ``.npz`` with a ``meta`` byte array, or a
``.safetensors`` file with the JSON in its header. Every file is written atomically
(:mod:`llm_adapter.formats._io`) under a unique temporary name.

The directory is guarded so that a resumed run can only continue the run that started it:

* ``manifest.json`` records the settings (spec, seed, windows, layers) and the *model
  identity* (:func:`model_identity`: SHA-256 of the config and of every state-dict tensor,
  computed once before anything is quantized); a run with another model or spec is a
  :class:`~llm_adapter.errors.CheckpointError` naming both.
* Each loaded layer is checked against the run: its kind and scalar fields (``bits``,
  ``group_size``, ...) against the spec, its shape against the module, its arrays against
  their checksums and its values for meaning (the stored format's own checks). A
  truncated, corrupt or mismatched file is a :class:`~llm_adapter.errors.CheckpointError`
  naming the file; it is **not** recomputed silently (delete the file to recompute that
  layer): a corrupt checkpoint means the disk or someone changed it, which the user should
  know.
* :func:`check_manifest` takes an exclusive ``fcntl.flock`` on ``<dir>/.lock`` for the
  whole run (a second run on the same directory, thread or process, gets a
  ``CheckpointError`` before any work) and removes orphaned temporaries (``.*.tmp``) a
  killed run left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from .. import methods
from ..errors import BusyError, CheckpointError, IntegrityWarning, QuantizedFormatError
from ..formats._integrity import json_digest, tensor_digest
from ..formats._io import jsonable, lock_dir, remove_orphans, write_file_atomically

__all__ = ["check_manifest", "layer_path", "load_layer", "model_identity", "save_layer"]

logger = logging.getLogger("llm_adapter.calibration")

MANIFEST_NAME = "manifest.json"
#: Config keys that do not change what the model computes (where it was loaded from, the
#: library that wrote it); left out of the identity's config digest.
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset",
                    "_attn_implementation")


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
        Its arrays, ``metadata()`` and ``stats`` (JSON-safe) are stored, with the SHA-256
        of every array (``meta["sha256"]``) and of the rest of the metadata
        (``meta["meta_sha256"]``, canonical JSON).

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
    meta = jsonable({"format": kind, **layer.metadata()})
    meta = json.dumps({**meta, "sha256": {k: tensor_digest(v) for k, v in sorted(arrays.items())},
                       "meta_sha256": json_digest(meta)})
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        blob = save(arrays, metadata={"layer": meta})
        return write_file_atomically(path, lambda f: f.write(blob))
    return write_file_atomically(
        path, lambda f: np.savez(f, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays))


def _read_file(path: Path):
    """(meta, arrays) of a layer file, as stored (no checks)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            meta = json.loads(header.get("layer") or header["glvq"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    else:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    return meta, arrays


def load_layer(path, *, spec=None, shape=None):
    """Read a layer written by :func:`save_layer` (or by the earlier per-method writers)
    and check it.

    Parameters
    ----------
    path : str or path-like
        The layer file.
    spec : QuantSpec, GLVQSpec, ..., optional
        The run's spec: the layer must be of its method's stored kind, and the scalar
        fields the layer records (``bits``, ``group_size``, ``d``, the method in its
        stats) must equal the spec's.
    shape : tuple of int, optional
        The module's weight shape ``(out, in)``; the layer's must equal it.

    Returns
    -------
    QuantizedLayer, LatticeLayer, ...

    Raises
    ------
    CheckpointError
        (a ``ValueError``) naming the file if it cannot be read (truncated, not a
        zip/safetensors file, bad JSON), an array does not match its checksum, its values
        are not a valid layer of its kind (the stored format's checks), its kind belongs
        to no registered method, or it does not match `spec` / `shape`. Files written
        before checksums existed load with an :class:`~llm_adapter.errors.IntegrityWarning`.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from llm_adapter.methods.uniform import QuantSpec, quantize_weight
    >>> q = quantize_weight(np.random.default_rng(0).standard_normal((8, 16)), spec=QuantSpec(bits=4, method="rtn"))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> p = save_layer(pathlib.Path(tmp.name) / "fc.npz", q)
    >>> load_layer(p, spec=QuantSpec(bits=3, method="rtn"))
    Traceback (most recent call last):
        ...
    llm_adapter.errors.CheckpointError: layer file '.../fc.npz' was written with bits = 4, this run has bits = 3; ...
    >>> tmp.cleanup()
    """
    path = Path(path)
    where = f"layer file {str(path)!r}"
    try:
        meta, arrays = _read_file(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile, zlib, safetensors, json, unicode errors
        raise CheckpointError(f"{where} cannot be read ({type(err).__name__}: {err}); it is truncated or "
                              "corrupt: delete it to recompute that layer") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: its metadata is not a JSON object; delete it to recompute that layer")
    digests = meta.pop("sha256", None)
    meta_digest = meta.pop("meta_sha256", None)
    if (digests is None) != (meta_digest is None):
        raise CheckpointError(f"{where}: its metadata is damaged (one of its two checksums is missing); "
                              "delete it to recompute that layer")
    if meta_digest is not None:
        try:
            ok = json_digest(meta) == meta_digest
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{where}: its metadata does not match its SHA-256 checksum (the file is "
                                  "corrupt or was modified); delete it to recompute that layer")
    if digests is None:
        warnings.warn(f"{where} has no checksums (written before bils added them); loaded without an "
                      "integrity check", IntegrityWarning, stacklevel=2)
    else:
        if not isinstance(digests, dict) or set(digests) != set(arrays):
            raise CheckpointError(f"{where}: its arrays {sorted(arrays)} differ from those recorded "
                                  f"({sorted(digests) if isinstance(digests, dict) else digests!r}); "
                                  "delete it to recompute that layer")
        bad = [k for k in sorted(arrays) if tensor_digest(arrays[k]) != digests[k]]
        if bad:
            raise CheckpointError(f"{where}: array(s) {bad} do not match their SHA-256 checksums (the file "
                                  "is corrupt or was modified); delete it to recompute that layer")
    kind = meta.get("format", "uniform")  # uniform checkpoints of earlier versions carry no kind
    try:
        method = methods.for_kind(kind)
    except (KeyError, TypeError):
        raise CheckpointError(f"{where} holds a layer of kind {kind!r}, which no registered method reads") from None
    try:
        layer = method.layer_type.from_arrays(arrays, meta)
        method.format.write(path.stem, layer, {})  # the stored format's checks (shapes, ranges, values)
    except QuantizedFormatError as err:
        raise CheckpointError(f"{where}: {err}") from err
    except Exception as err:  # noqa: BLE001 - anything a malformed file causes in from_arrays
        raise CheckpointError(f"{where} is not a valid {kind} layer ({type(err).__name__}: {err}); "
                              "delete it to recompute that layer") from err
    if shape is not None and tuple(layer.shape) != tuple(shape):
        raise CheckpointError(f"{where} holds a layer of shape {tuple(layer.shape)}, the module has "
                              f"{tuple(shape)}; this checkpoint belongs to another model")
    if spec is not None:
        _check_against_spec(where, layer, kind, spec)
    return layer


def _check_against_spec(where: str, layer, kind: str, spec) -> None:
    want = methods.for_spec(spec)
    if want.format.kind != kind:
        raise CheckpointError(f"{where} holds a {kind} layer, this run ({spec.method}) writes "
                              f"{want.format.kind} layers; use another checkpoint directory")
    sd = spec.to_dict()
    lm = layer.metadata()
    for key, value in lm.items():
        if key in ("stats", "format") or key not in sd or isinstance(value, (dict, list)):
            continue
        if value != sd[key]:
            raise CheckpointError(f"{where} was written with {key} = {value!r}, this run has {key} = "
                                  f"{sd[key]!r}; use another checkpoint directory")
    made_by = (getattr(layer, "stats", None) or {}).get("method")
    if made_by is not None and made_by != spec.method:
        raise CheckpointError(f"{where} was made by method {made_by!r}, this run uses {spec.method!r}; "
                              "use another checkpoint directory")


def model_identity(model) -> dict:
    """What identifies `model` in a checkpoint manifest: its name, and SHA-256 digests of
    its config and of its weights.

    The weights digest runs once over every state-dict tensor (name, dtype, shape,
    bytes; on the CPU): 0.3 GB/s measured on a busy 2-core machine (268 MB in 0.86 s), so
    about a minute for a 7B fp16 model there; the config digest over ``config.to_dict()``
    without the keys that name where it came from (``_name_or_path``,
    ``transformers_version``, ...). Call it before quantizing: the weights change in place.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (anything with ``state_dict()``; ``config`` optional).

    Returns
    -------
    dict
        ``{"name": str, "config_sha256": hex or None, "weights_sha256": hex}``.

    Examples
    --------
    >>> import torch
    >>> a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    >>> model_identity(a) == model_identity(a), model_identity(a) == model_identity(b)
    (True, False)
    """
    import torch

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{list(value.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    config = getattr(model, "config", None)
    cfg_digest = None
    name = type(model).__name__
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG}
        cfg_digest = json_digest(jsonable(cfg))
        name = getattr(config, "_name_or_path", "") or name
    return {"name": str(name), "config_sha256": cfg_digest, "weights_sha256": h.hexdigest()}


def check_manifest(directory, manifest: dict, *, model=None):
    """Lock `directory` for this run, remove orphaned temporaries, and create
    ``manifest.json`` = `manifest` (plus the model identity) or check that the one there
    is equal (a resumed run must continue the same run).

    Parameters
    ----------
    directory : str or path-like
        The checkpoint directory (created if needed).
    manifest : dict
        The run's settings (JSON-safe): spec, seed, windows, layers.
    model : torch.nn.Module, optional
        Recorded as ``manifest["model"]`` = :func:`model_identity` (compute it before the
        weights change). A manifest written before identities were recorded is accepted
        with a warning when everything else matches.

    Returns
    -------
    DirLock
        The lock of the directory: call ``release()`` when the run ends (the driver does
        so in ``finally``; a killed process releases it with its file descriptors).

    Raises
    ------
    CheckpointError
        If another run holds the directory, or the manifest there records another model
        (the message names both) or other settings (it names the keys and both values),
        or it cannot be read.
    """
    directory = Path(directory)
    try:
        lock = lock_dir(directory, f"`checkpoint_dir` {str(directory)!r}")
    except BusyError as err:
        raise CheckpointError(str(err)) from None
    try:
        remove_orphans(directory, ".*.tmp")
        if model is not None:
            manifest = {**manifest, "model": model_identity(model)}
        manifest = jsonable(manifest)
        path = directory / MANIFEST_NAME
        if path.exists():
            _compare(directory, path, manifest)
        else:
            text = json.dumps(manifest, indent=1, sort_keys=True)
            write_file_atomically(path, lambda f: f.write(text), binary=False)
    except BaseException:
        lock.release()
        raise
    return lock


def _compare(directory: Path, path: Path, manifest: dict) -> None:
    from ..formats.native import read_json

    where = f"`checkpoint_dir` {str(directory)!r}"
    try:
        old = read_json(path)
    except QuantizedFormatError as err:
        raise CheckpointError(f"{where}: {err}; delete the directory to start again") from err
    if not isinstance(old, dict):
        raise CheckpointError(f"{where}: {MANIFEST_NAME} is not a JSON object; delete the directory to start again")
    if old == manifest:
        return
    if "model" not in old and "model" in manifest and {**old, "model": manifest["model"]} == manifest:
        logger.warning("%s: the manifest (written before model identities were recorded) does not identify "
                       "the model; resuming without that check", where)
        return
    new_model, old_model = manifest.get("model"), old.get("model")
    if "model" in manifest and old_model != new_model:
        def describe(m):
            if not isinstance(m, dict):
                return repr(m)
            return (f"{m.get('name')!r} (weights sha256 {str(m.get('weights_sha256'))[:12]}, "
                    f"config sha256 {str(m.get('config_sha256'))[:12]})")

        raise CheckpointError(f"{where} holds layers of model {describe(old_model)}, but this run quantizes "
                              f"model {describe(new_model)}; use another directory or delete it")
    if old.get("spec") != manifest.get("spec"):
        raise CheckpointError(f"{where} holds a run with spec {old.get('spec')}, but this run's spec is "
                              f"{manifest.get('spec')}; use another directory or delete it")
    keys = sorted(k for k in set(old) | set(manifest) if k != "model" and old.get(k) != manifest.get(k))
    diff = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in keys)
    raise CheckpointError(f"{where} holds a run with different settings ({diff}); use another directory "
                          "or delete it")

"""Export quantized layers as a GPTQ checkpoint (the layout transformers, vLLM, exllama,
GPTQModel read).

Per quantized linear ``<name>`` (``W`` is ``(out, in)``, ``G`` groups)::

    <name>.qweight  int32   [in * bits / 32, out]           codes packed along the input dim
    <name>.qzeros   int32   [G, out * bits / 32]            zero - 1 packed along the output dim
    <name>.scales   float16 [G, out]
    <name>.g_idx    int32   [in]                            group of each input column
    <name>.bias     float16 [out]                           if the layer has one

Dequantization: ``W[j, i] = scales[g_idx[i], j] * (q[i, j] - (qzero[g_idx[i], j] + 1))``.
Packing is the little-endian bit stream of :mod:`llm_adapter.formats.packing` (3-bit:
32 values in 3 words, values straddling word boundaries).

The v1 zero-point pitfall
-------------------------
The original (``format: "gptq"``, "v1") layout stores ``zero - 1``, and readers add 1
back after masking to ``bits`` bits. A zero point of 0 — possible with an asymmetric grid
whose group minimum is (close to) 0 — is stored as ``-1``, i.e. ``2**bits - 1`` once
masked (AutoGPTQ's packer does not even mask it, and the all-ones word corrupts the
neighbouring zeros), and every v1 reader then dequantizes with zero ``2**bits`` instead
of 0: the whole group is shifted by ``2**bits`` steps. GPTQModel's ``gptq_v2`` stores the
zero itself to avoid this.

What :func:`export_gptq` does with ``checkpoint_format="gptq"``: a (row, group) with zero
0 whose codes are all below ``2**bits - 1`` is rewritten losslessly as zero 1 and codes
+ 1 (``(q + 1) - 1 = q - 0``); if any such group uses the top code, no v1 encoding is
exact and the export fails with a :class:`GPTQExportError` naming the layers (use
``checkpoint_format="gptq_v2"``). Symmetric grids (zero ``2**(bits-1)``) never hit this.
Zeros are masked to ``bits`` bits before packing, so no value spills into its neighbours.

Integrity
---------
The ``model.safetensors`` header metadata carries ``bils.sha256`` (a JSON object: the
SHA-256 of every tensor's dtype, shape and bytes) and ``bils.config_sha256`` (of
``config.json``'s canonical JSON); GPTQ readers ignore extra header keys.
:func:`verify_gptq` reads a checkpoint back and checks them, plus the layout and the
values of every quantized layer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import methods
from ..errors import QuantizedFormatError
from ..errors import IntegrityWarning
from ._integrity import json_digest, torch_digest
from ._io import write_dir_atomically
from .native import library_version, read_json
from .packing import SUPPORTED_BITS, pack, period

__all__ = ["GPTQExportError", "export_gptq", "gptq_tensors", "quantization_config", "verify_gptq"]

logger = logging.getLogger(__name__)

_FORMATS = ("gptq", "gptq_v2")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Keys of the safetensors header metadata holding the SHA-256 of every tensor (a JSON
#: object) and of config.json's canonical JSON; readers of GPTQ checkpoints ignore them.
SHA_KEY = "bils.sha256"
CONFIG_SHA_KEY = "bils.config_sha256"


class GPTQExportError(QuantizedFormatError):
    """The layers cannot be written in the requested GPTQ layout.

    A :class:`~llm_adapter.formats.native.QuantizedFormatError` (so a
    :class:`ValueError`); the message names the layers and what is wrong.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from llm_adapter.methods.uniform import QuantizedLayer
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> q = QuantizedLayer(codes=np.zeros((8, 8), np.uint8), scales=np.ones((8, 1), np.float32),
    ...                    zeros=np.full((8, 1), 8.0, np.float32), g_idx=np.zeros(8, np.int32),
    ...                    bits=4, group_size=-1)
    >>> export_gptq(model, {"1": q}, "gptq-out")
    Traceback (most recent call last):
        ...
    llm_adapter.formats.gptq.GPTQExportError: cannot export: '1' is not an nn.Linear of the model
    """


def quantization_config(
    *,
    bits: int,
    group_size: int,
    damp_percent: float,
    desc_act: bool,
    sym: bool,
    true_sequential: bool = True,
    checkpoint_format: str = "gptq",
) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for a GPTQ checkpoint."""
    return {
        "quant_method": "gptq",
        "bits": int(bits),
        "group_size": int(group_size),
        "damp_percent": float(damp_percent),
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "true_sequential": bool(true_sequential),
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": [f"bils:{library_version()}"]},
    }


def gptq_tensors(
    name: str, layer, *, checkpoint_format: str = "gptq", bias_dtype=np.float16
) -> dict[str, np.ndarray]:
    """The GPTQ tensors of one layer: ``{<name>.qweight, .qzeros, .scales, .g_idx[, .bias]}``.

    Raises
    ------
    GPTQExportError
        If the shape does not pack into whole int32 words (``in`` and ``out`` must be
        multiples of 32 at 3 bits, of ``32 // bits`` otherwise), the zeros are not
        integers in ``[0, 2**bits - 1]``, or a zero of 0 cannot be written in v1 (see
        the module notes).
    """
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"`checkpoint_format` must be one of {_FORMATS}, got {checkpoint_format!r}")
    from ..methods.uniform import check_layer  # lazy: the methods import the packing of this package

    bits = int(layer.bits)
    out_f, in_f = np.asarray(layer.codes).shape
    values, _ = period(bits)
    for dim, size in (("in_features", in_f), ("out_features", out_f)):
        if size % values:
            raise GPTQExportError(
                f"layer {name!r}: {dim} = {size} is not a multiple of {values}, so {bits}-bit "
                f"values do not fill whole int32 words in the GPTQ layout"
            )
    maxq = (1 << bits) - 1
    zeros = np.asarray(layer.zeros, dtype=np.float64)
    zint = np.rint(zeros)
    if np.any(zint != zeros) or zint.min() < 0 or zint.max() > maxq:
        raise GPTQExportError(
            f"layer {name!r}: GPTQ needs integer zero points in [0, {maxq}]; got range "
            f"[{zeros.min()}, {zeros.max()}]" + (" with non-integers" if np.any(zint != zeros) else "")
        )
    check_layer(name, layer)
    zint = zint.astype(np.int64)
    codes = np.asarray(layer.codes).astype(np.int64)
    g_idx = np.asarray(layer.g_idx).astype(np.int64)
    if checkpoint_format == "gptq":
        codes, zint = _shift_zero_groups(name, codes, zint, g_idx, maxq)
        stored = (zint - 1) & maxq  # v1: zero - 1, masked to `bits` bits
    else:
        stored = zint
    tensors = {
        f"{name}.qweight": pack(codes.T, bits, axis=0),  # [in * bits / 32, out]
        f"{name}.qzeros": pack(stored.T, bits, axis=1),  # [G, out * bits / 32]
        f"{name}.scales": np.ascontiguousarray(np.asarray(layer.scales).T.astype(np.float16)),
        f"{name}.g_idx": np.ascontiguousarray(g_idx.astype(np.int32)),
    }
    if layer.bias is not None:
        tensors[f"{name}.bias"] = np.ascontiguousarray(np.asarray(layer.bias).astype(bias_dtype))
    return tensors


def _shift_zero_groups(name, codes, zint, g_idx, maxq):
    """Rewrite (row, group) pairs with zero 0 as zero 1, codes + 1 (exact), for v1."""
    rows, groups = np.nonzero(zint == 0)
    if rows.size == 0:
        return codes, zint
    codes, zint = codes.copy(), zint.copy()
    stuck = 0
    for g in np.unique(groups):
        cols = g_idx == g
        r = rows[groups == g]
        block = codes[np.ix_(r, cols)]
        ok = block.max(axis=1, initial=0) < maxq
        stuck += int((~ok).sum())
        r_ok = r[ok]
        codes[np.ix_(r_ok, cols)] += 1
        zint[r_ok, g] = 1
    if stuck:
        raise GPTQExportError(
            f"layer {name!r}: {stuck} (row, group) pair(s) have zero point 0 and use the top code "
            f"{maxq}; GPTQ v1 stores zero - 1, which every v1 reader turns into zero {maxq + 1}. "
            "Export with checkpoint_format='gptq_v2', or quantize with a symmetric grid"
        )
    logger.info("layer %s: %d group(s) with zero 0 rewritten as zero 1, codes + 1 (exact)", name, rows.size)
    return codes, zint


def export_gptq(
    model,
    layers: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    desc_act: bool | None = None,
    damp_percent: float = 0.01,
    sym: bool | None = None,
    true_sequential: bool = True,
    checkpoint_format: str = "gptq",
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Write a transformers-style GPTQ checkpoint directory, atomically.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the layers belong to (its config and its non-quantized tensors —
        embeddings, norms, head, unquantized linears — are written too).
    layers : dict of str to QuantizedLayer
        Module name to quantized layer; every name must be an ``nn.Linear`` of `model`
        of the same shape, or a transformers ``Conv1D`` whose transposed weight has that
        shape (stored as the equivalent Linear: ``qweight`` packs ``W^T`` = the Conv1D
        weight, as GPTQModel does for GPT-2), or a fused MoE expert ``<experts>.<param>.<e>``
        (all experts of a weight): then every tensor is written under the name
        ``save_pretrained`` uses (:func:`~llm_adapter.formats.compressed_tensors.checkpoint_rows`;
        Mixtral's ``gate_up_proj`` expert ``e`` becomes ``block_sparse_moe.experts.<e>.w1``
        and ``w3``). All layers must share ``bits`` and ``group_size``.
    out_dir : str or path-like
        Directory to create (``config.json``, ``model.safetensors``, tokenizer files,
        ``generation_config.json`` if the model has one).
    tokenizer : transformers tokenizer, optional
        Saved with ``save_pretrained`` into `out_dir`.
    desc_act : bool, optional
        Whether act-order was used. Default: true if any layer has a non-identity
        ``perm``. Must be true when a ``g_idx`` is not ``i // group_size`` (readers with
        ``desc_act=False`` may ignore ``g_idx``).
    damp_percent : float
        Hessian damping used (recorded only).
    sym : bool, optional
        Default: true if every zero equals ``2**(bits - 1)``. ``sym=True`` with other
        zeros is an error (symmetric kernels ignore ``qzeros``).
    true_sequential : bool
        Recorded only.
    checkpoint_format : {"gptq", "gptq_v2"}
        ``"gptq"`` (v1, stores zero − 1; the default, read by everything) or
        ``"gptq_v2"`` (stores the zero; GPTQModel). See the module notes.
    dtype : torch.dtype, optional
        dtype of the non-quantized floating tensors and biases; default ``torch.float16``.
    overwrite : bool
        Replace an existing `out_dir`.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    GPTQExportError
        If a name is not a linear layer of `model`, a shape differs, bits or group sizes
        are mixed, or a layer cannot be packed (see :func:`gptq_tensors`).
    BusyError
        If another thread or process is writing `out_dir` (:func:`~llm_adapter.formats._io.claim_dir`).

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(  # a tiny random Llama: nothing is downloaded
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> from llm_adapter.calibration import quantize_model
    >>> from llm_adapter.methods.uniform import QuantSpec
    >>> windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    >>> layers = quantize_model(model, windows, QuantSpec(bits=4, method="rtn"), progress=False)
    >>> import json, tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_gptq(model, layers, pathlib.Path(tmp.name) / "gptq")
    >>> sorted(p.name for p in path.iterdir())
    ['config.json', 'generation_config.json', 'model.safetensors']
    >>> qc = json.loads((path / "config.json").read_text())["quantization_config"]
    >>> qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["format"]
    ('gptq', 4, -1, False, 'gptq')
    >>> tmp.cleanup()
    """
    import torch
    from safetensors.torch import save_file

    from ..nn.fused import expert_slot, is_conv1d

    dtype = torch.float16 if dtype is None else dtype
    if not isinstance(layers, dict) or not layers:
        raise GPTQExportError("`layers` must be a non-empty dict of name -> QuantizedLayer")
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"`checkpoint_format` must be one of {_FORMATS}, got {checkpoint_format!r}")
    target = Path(os.fspath(out_dir))
    if target.exists() and not overwrite:
        raise FileExistsError(f"`out_dir` {str(target)!r} already exists; pass overwrite=True to replace it")

    modules = dict(model.named_modules())
    problems = []
    for name, layer in layers.items():
        mod = modules.get(name)
        kind = _kind(layer)
        if kind != "uniform":
            problems.append(f"{name!r} is a {type(layer).__name__} ({kind}), not a uniform-grid layer "
                            f"({kind} layers have no GPTQ layout; save them with save_quantized)")
        elif mod is None and expert_slot(modules, name) is not None:
            emod, param, _ = expert_slot(modules, name)
            if tuple(getattr(emod, param).shape[1:]) != tuple(layer.shape):
                problems.append(f"{name!r} has shape {tuple(getattr(emod, param).shape[1:])}, the quantized layer "
                                f"{layer.shape}")
        elif not isinstance(mod, torch.nn.Linear) and not is_conv1d(mod):
            problems.append(f"{name!r} is not an nn.Linear of the model")
        elif (tuple(mod.weight.shape)[::-1] if is_conv1d(mod) else tuple(mod.weight.shape)) != layer.shape:
            problems.append(f"{name!r} has shape {tuple(mod.weight.shape)}, the quantized layer {layer.shape}")
    if problems:
        raise GPTQExportError("cannot export: " + "; ".join(problems))
    bits_set = {int(l.bits) for l in layers.values()}
    gs_set = {int(l.group_size) for l in layers.values()}
    if len(bits_set) != 1 or len(gs_set) != 1:
        raise GPTQExportError(
            f"a GPTQ checkpoint has one `bits` and one `group_size`; the layers have bits "
            f"{sorted(bits_set)} and group sizes {sorted(gs_set)}"
        )
    (bits,), (group_size,) = bits_set, gs_set
    if bits not in SUPPORTED_BITS:
        raise GPTQExportError(f"`bits` must be one of {SUPPORTED_BITS} for GPTQ, got {bits}")

    static = {name: _static_g_idx(l) for name, l in layers.items()}
    if desc_act is None:
        desc_act = any(
            l.perm is not None and not np.array_equal(np.asarray(l.perm), np.arange(l.shape[1]))
            for l in layers.values()
        )
    if not desc_act:
        dynamic = [n for n, ok in static.items() if not ok]
        if dynamic:
            raise GPTQExportError(
                f"`desc_act` is False but the g_idx of {dynamic[:3]} is not i // group_size; "
                "readers may ignore g_idx then. Pass desc_act=True"
            )
    half = 1 << (bits - 1)
    all_sym = all(np.all(np.asarray(l.zeros) == half) for l in layers.values())
    if sym is None:
        sym = all_sym
    elif sym and not all_sym:
        raise GPTQExportError(
            f"`sym` is True but some zero points differ from {half} = 2**(bits-1); pass sym=False"
        )

    tensors: dict[str, torch.Tensor] = {}
    if any(name not in modules for name in layers):  # fused MoE experts
        tensors = _moe_tensors(model, layers, modules, checkpoint_format, dtype)
        layers = {}
    for name, layer in layers.items():
        packed = gptq_tensors(name, layer, checkpoint_format=checkpoint_format, bias_dtype=np.float32)
        for key, arr in packed.items():
            t = torch.from_numpy(arr)
            tensors[key] = t.to(dtype) if key.endswith(".bias") else t
    skip = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    seen_ptrs: set[tuple] = set()
    for key, value in ({} if not layers else model.state_dict()).items():
        if key in skip:
            continue
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and (ptr, value.storage_offset(), tuple(value.shape)) in seen_ptrs:
            continue  # tied weight (e.g. lm_head = embed_tokens): saved once, like save_pretrained
        if ptr is not None:
            seen_ptrs.add((ptr, value.storage_offset(), tuple(value.shape)))
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()

    config = json.loads(model.config.to_json_string(use_diff=False))
    config["quantization_config"] = quantization_config(
        bits=bits,
        group_size=group_size,
        damp_percent=damp_percent,
        desc_act=desc_act,
        sym=sym,
        true_sequential=true_sequential,
        checkpoint_format=checkpoint_format,
    )
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name
    if "dtype" in config:
        config["dtype"] = dtype_name

    digests = {
        SHA_KEY: json.dumps({key: torch_digest(t) for key, t in sorted(tensors.items())}, sort_keys=True),
        CONFIG_SHA_KEY: json_digest(config),
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **digests})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    path = write_dir_atomically(target, fill, on_exists="replace" if overwrite else "error")
    logger.info(
        "wrote GPTQ checkpoint %s: %d layers, %d-bit, group size %d, desc_act=%s, sym=%s, format %s",
        path, len(layers), bits, group_size, desc_act, sym, checkpoint_format,
    )
    return path


def _moe_tensors(model, layers, modules, checkpoint_format, dtype):
    """All tensors of a checkpoint with fused-expert layers, under the names ``save_pretrained``
    writes (:func:`~llm_adapter.formats.compressed_tensors.checkpoint_rows`): a fused
    ``gate_up_proj`` expert becomes e.g. Mixtral's ``w1`` and ``w3`` (its row halves)."""
    import torch

    from ._slots import quantized_slots, row_layer
    from .compressed_tensors import CompressedTensorsExportError, checkpoint_rows

    slot_layer, quantized, fused = quantized_slots(model, modules, layers, GPTQExportError)
    skip = {f"{n}.weight" for n in layers if n in modules} | {f"{n}.bias" for n, l in layers.items()
                                                              if n in modules and l.bias is not None} | set(fused)
    float_sd, seen = {}, set()
    for key, value in model.state_dict().items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if key in skip or (ptr is not None and (ptr, value.storage_offset(), tuple(value.shape)) in seen):
            continue
        if ptr is not None:
            seen.add((ptr, value.storage_offset(), tuple(value.shape)))
        float_sd[key] = value.detach().cpu()
    try:
        plain, rows = checkpoint_rows(model, float_sd, quantized)
    except CompressedTensorsExportError as err:
        raise GPTQExportError(str(err)) from None
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in plain.items()}
    for key, (slot, r) in sorted(rows.items()):
        name, layer = slot_layer[slot]
        sub = layer if np.array_equal(r, np.arange(layer.shape[0])) else row_layer(layer, r)
        if layer.bias is not None and sub is not layer:
            sub.bias = np.asarray(layer.bias)[r]
        for k, arr in gptq_tensors(key[:-len(".weight")], sub, checkpoint_format=checkpoint_format,
                                   bias_dtype=np.float32).items():
            t = torch.from_numpy(arr)
            tensors[k] = t.to(dtype) if k.endswith(".bias") else t
    return tensors


def _static_g_idx(layer) -> bool:
    in_f = layer.shape[1]
    gs = in_f if layer.group_size == -1 else layer.group_size
    return bool(np.array_equal(np.asarray(layer.g_idx), np.arange(in_f) // gs))


def _kind(layer) -> str:
    """The stored-format kind of `layer`'s method (``"uniform"`` for the integer-grid methods)."""
    try:
        return methods.for_layer(layer).format.kind
    except TypeError:
        return "unknown"


def verify_gptq(directory) -> tuple[dict, dict]:
    """Read back a GPTQ checkpoint written by :func:`export_gptq` and check it.

    Checks, each failure a :class:`QuantizedFormatError` naming the file and the field:
    ``config.json`` decodes (UTF-8, JSON) and has a GPTQ ``quantization_config``; the
    SHA-256 of every tensor and of ``config.json`` recorded in the ``model.safetensors``
    header match (checkpoints without them, e.g. from other tools, are checked for the
    rest with an :class:`~llm_adapter.errors.IntegrityWarning`); per quantized layer the
    shapes and dtypes of ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` agree with
    ``bits`` and ``group_size``, the scales are positive and finite, and ``g_idx`` is a
    valid group map.

    Parameters
    ----------
    directory : str or path-like
        The checkpoint directory.

    Returns
    -------
    config : dict
        The parsed ``config.json``.
    tensors : dict of str to torch.Tensor
        Every stored tensor.

    Examples
    --------
    >>> import torch, tempfile, pathlib
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> from llm_adapter.calibration import quantize_model
    >>> from llm_adapter.methods.uniform import QuantSpec
    >>> layers = quantize_model(model, torch.zeros(1, 4, dtype=torch.long), QuantSpec(bits=4, method="rtn"),
    ...                         progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> config, tensors = verify_gptq(export_gptq(model, layers, pathlib.Path(tmp.name) / "gptq"))
    >>> config["quantization_config"]["bits"], tensors["model.layers.0.mlp.up_proj.qweight"].shape
    (4, torch.Size([4, 64]))
    >>> tmp.cleanup()
    """
    import warnings

    import torch
    from safetensors import safe_open

    root = Path(os.fspath(directory))
    cfg_path, st_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a GPTQ checkpoint: missing {p.name}")
    config = read_json(cfg_path)
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise QuantizedFormatError(f"{cfg_path}: `quantization_config.quant_method` must be 'gptq'")
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise QuantizedFormatError(f"{cfg_path}: `quantization_config.bits` must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size != -1 and group_size < 1):
        raise QuantizedFormatError(f"{cfg_path}: `quantization_config.group_size` must be -1 or a positive int, "
                                   f"got {group_size!r}")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors' own error types
        raise QuantizedFormatError(f"{st_path} cannot be read: {err}") from err
    if SHA_KEY in header or CONFIG_SHA_KEY in header:
        try:
            digests = json.loads(header[SHA_KEY])
            want_cfg = header[CONFIG_SHA_KEY]
        except (KeyError, ValueError) as err:
            raise QuantizedFormatError(f"{st_path}: the checksum entries of its header are damaged: {err}") from err
        if not isinstance(digests, dict) or set(digests) != set(tensors):
            raise QuantizedFormatError(f"{st_path}: the tensors differ from those recorded in its header checksums")
        bad = [k for k in sorted(tensors) if torch_digest(tensors[k]) != digests[k]]
        if bad:
            raise QuantizedFormatError(f"{st_path}: tensor(s) {bad[:5]} do not match their SHA-256 checksums "
                                       "(the file is corrupt or was modified)")
        try:
            ok = json_digest(config) == want_cfg
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise QuantizedFormatError(f"{cfg_path}: the content does not match the SHA-256 recorded in "
                                       f"{WEIGHTS_NAME} (the file is corrupt or was edited)")
    else:
        warnings.warn(f"{st_path} records no checksums (not written by bils); checked without them",
                      IntegrityWarning, stacklevel=2)
    maxq_words = 32 // bits if 32 % bits == 0 else None
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        name = key[: -len(".qweight")]

        def bad(msg):
            raise QuantizedFormatError(f"{st_path}: layer {name!r}: {msg}")

        parts = {}
        for field, dtype in (("qweight", torch.int32), ("qzeros", torch.int32), ("scales", torch.float16),
                             ("g_idx", torch.int32)):
            t = tensors.get(f"{name}.{field}")
            if t is None:
                bad(f"has no tensor `{field}`")
            if t.dtype != dtype or t.ndim != (1 if field == "g_idx" else 2):
                bad(f"`{field}` must be a {'1' if field == 'g_idx' else '2'}-D {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
            parts[field] = t
        qweight, qzeros, scales, g_idx = parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"]
        n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
        n_groups = 1 if group_size == -1 else -(-n_in // group_size)
        if (qweight.shape[0] * 32) % bits or (maxq_words is None and n_in % 32):
            bad(f"`qweight` has {qweight.shape[0]} rows, which do not hold whole {bits}-bit values")
        if tuple(scales.shape) != (n_groups, n_out):
            bad(f"`scales` must have shape {(n_groups, n_out)}, got {tuple(scales.shape)}")
        if tuple(qzeros.shape) != (n_groups, n_out * bits // 32):
            bad(f"`qzeros` must have shape {(n_groups, n_out * bits // 32)}, got {tuple(qzeros.shape)}")
        if tuple(g_idx.shape) != (n_in,):
            bad(f"`g_idx` must have shape ({n_in},), got {tuple(g_idx.shape)}")
        s = scales.float()
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            bad("`scales` must be positive and finite")
        gi = g_idx.long()
        if n_in and (int(gi.min()) < 0 or int(gi.max()) >= n_groups):
            bad(f"`g_idx` must lie in [0, {n_groups - 1}]")
        gsz = n_in if group_size == -1 else group_size
        want = torch.full((n_groups,), gsz, dtype=torch.long)
        want[-1] = n_in - gsz * (n_groups - 1)
        if n_in and not torch.equal(torch.bincount(gi, minlength=n_groups), want):
            bad(f"`g_idx` is not a valid group map (groups of {gsz} columns)")
    return config, tensors

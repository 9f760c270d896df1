r"""Export as a compressed-tensors ``pack-quantized`` checkpoint (the format vLLM loads).

Per quantized layer ``<name>`` (weight ``(out, in)``, ``b`` bits, ``G`` groups):

=========================  =======  ==========================  ==========================================
tensor                     dtype    shape                       meaning
=========================  =======  ==========================  ==========================================
<name>.weight_packed       int32    (out, ceil(in * b / 32))    codes, densely packed along the input dim
<name>.weight_scale        dtype    (out, G)                    step per output and group
<name>.weight_zero_point   int32    (ceil(out * b / 32), G)     zero points, packed along the output dim
                                                                (asymmetric grids only)
<name>.weight_shape        int64    (2,)                        ``[out, in]``
=========================  =======  ==========================  ==========================================

compressed-tensors stores signed values ``q - 2^{b-1}`` offset by ``2^{b-1}`` before
packing, so the packed values are exactly our codes ``c`` and zero points ``z``
(32 consecutive values in ``b`` words, value ``k`` at bit ``b k``, which is the layout of
:func:`llm_adapter.formats.packing.pack` truncated to ``ceil(n b / 32)`` words), and

.. math::

    W_{ji} = (c_{ji} - z_{j, g(i)})\, s_{j, g(i)}

computed in the scale dtype, as :meth:`QuantizedLayer.dequantize` does in float32. With
``dtype=torch.float32`` the library's decompression gives our dequantized weights bit for
bit; with float16 scales it gives them computed with the fp16-rounded scales, rounded to
fp16 (the product of an fp16 scale and a small integer is exact in float32).

Requirements, checked with errors naming the layer: uniform-grid layers, one ``bits`` and
one ``group_size`` for the checkpoint, integer zero points, groups dividing ``in``
(compressed-tensors has no partial last group), static groups (``g_idx = i // group``).
Linear and GPT-2 ``Conv1D`` layers are exported (the Conv1D weight as its ``(out, in)``
transpose), and the experts of fused MoE weights.

Tensor names are those of the checkpoint that ``save_pretrained`` writes, not the module
names of the loaded model: transformers 5 converts some checkpoints on load (Mixtral's
``block_sparse_moe.experts.<e>.w1/w3/w2`` become ``mlp.experts.gate_up_proj`` /
``down_proj``) and converts back on save. :func:`checkpoint_rows` finds, for every quantized
layer, which rows of it end up under which checkpoint name, by sending row-index tensors
through transformers' own ``revert_weight_conversion``; each checkpoint weight is then
written from those rows of the layer (a uniform layer's rows are independent: codes,
scales and zero points are per output row). So a fused ``gate_up_proj`` expert becomes
Mixtral's ``w1`` (its first ``I`` rows) and ``w3`` (the rest), as in the original checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import methods
from ._io import write_dir_atomically
from ._slots import quantized_slots, row_layer
from .native import library_version
from .packing import pack

__all__ = ["CompressedTensorsExportError", "checkpoint_rows", "compressed_tensors_config",
           "compressed_tensors_tensors", "export_compressed_tensors"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


class CompressedTensorsExportError(ValueError):
    """A layer cannot be written as compressed-tensors ``pack-quantized``; the message names it."""


def _dense_pack(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """compressed-tensors' dense packing: :func:`pack` truncated to ``ceil(n * bits / 32)`` words."""
    n = values.shape[axis]
    words = pack(values, bits, axis=axis)
    keep = -(-n * bits // 32)
    return np.ascontiguousarray(np.take(words, np.arange(keep), axis=axis))


def compressed_tensors_config(*, bits: int, group_size: int, sym: bool, ignore: list[str],
                              targets=("Linear",)) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` (one config group: int weights, no
    activation quantization)."""
    weights = {"num_bits": int(bits), "type": "int", "symmetric": bool(sym),
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else int(group_size),
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": list(targets), "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "quantizer": f"bils:{library_version()}",
    }


def compressed_tensors_tensors(name: str, layer, *, scale_dtype=np.float16) -> dict[str, np.ndarray]:
    """The compressed-tensors tensors of one uniform layer (see the module notes).

    Raises
    ------
    CompressedTensorsExportError
        If the zero points are not integers, a group does not divide ``in``, or the
        groups are not static.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.methods.uniform import QuantizedLayer
    >>> q = QuantizedLayer(codes=np.arange(64, dtype=np.uint8).reshape(2, 32) % 16,
    ...                    scales=np.ones((2, 1), np.float32), zeros=np.full((2, 1), 8.0, np.float32),
    ...                    g_idx=np.zeros(32, np.int32), bits=4, group_size=-1)
    >>> t = compressed_tensors_tensors("fc", q)
    >>> {k: v.shape for k, v in t.items()}
    {'fc.weight_packed': (2, 4), 'fc.weight_scale': (2, 1), 'fc.weight_zero_point': (1, 1), 'fc.weight_shape': (2,)}
    """
    out_f, in_f = layer.shape
    bits = int(layer.bits)
    gs = in_f if layer.group_size == -1 else int(layer.group_size)
    if in_f % gs:
        raise CompressedTensorsExportError(
            f"layer {name!r}: group_size {gs} does not divide in_features {in_f} (compressed-tensors has no "
            "partial last group)")
    if not np.array_equal(np.asarray(layer.g_idx), np.arange(in_f) // gs):
        raise CompressedTensorsExportError(f"layer {name!r}: g_idx is not i // group_size (not supported here)")
    zeros = np.asarray(layer.zeros, dtype=np.float64)
    if not np.array_equal(zeros, np.round(zeros)):
        raise CompressedTensorsExportError(f"layer {name!r}: zero points are not integers")
    codes = np.asarray(layer.codes).astype(np.int64)
    return {
        f"{name}.weight_packed": _dense_pack(codes, bits, axis=1),
        f"{name}.weight_scale": np.asarray(layer.scales).astype(scale_dtype),
        f"{name}.weight_zero_point": _dense_pack(zeros.astype(np.int64), bits, axis=0),
        f"{name}.weight_shape": np.array([out_f, in_f], dtype=np.int64),
    }


_ROW_BITS = 32  # row ids: slot * 2**32 + row, exact in float64


def checkpoint_rows(model, state_dict: dict, quantized: dict) -> tuple[dict, dict]:
    """Map the model's tensors to the names ``save_pretrained`` would write.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    state_dict : dict of str to torch.Tensor
        The model's non-quantized tensors, by parameter name.
    quantized : dict of str to (int, int)
        Parameter name of each quantized weight (``<module>.weight``, or the fused
        ``<experts>.<param>`` 3-D weight) to ``(first slot, rows)``: its layers are slots
        ``first, first + 1, ...`` (one per expert for a 3-D weight), each with ``rows`` rows.

    Returns
    -------
    tensors : dict of str to torch.Tensor
        The non-quantized tensors under their checkpoint names.
    rows : dict of str to (int, ndarray)
        Checkpoint weight name (``... .weight``) to ``(slot, row indices)``: the rows of
        quantized layer ``slot`` stored under that name.
    """
    import torch

    ids = {}
    for name, (first, n_rows) in quantized.items():
        p = model.get_parameter(name)
        slots = torch.arange(first, first + (p.shape[0] if p.ndim == 3 else 1), dtype=torch.float64)
        t = slots[:, None] * float(2 ** _ROW_BITS) + torch.arange(n_rows, dtype=torch.float64)[None, :]
        ids[name] = (t if p.ndim == 3 else t[0])[..., None]  # (E, rows, 1) or (rows, 1)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no conversion on load, names are kept
        def revert_weight_conversion(model, sd):
            return sd
    out = revert_weight_conversion(model, {**state_dict, **ids})
    tensors, rows = {}, {}
    for key, value in out.items():
        if value.dtype == torch.float64 and value.ndim == 2 and value.shape[-1] == 1 and key.endswith(".weight"):
            v = value[:, 0].to(torch.int64).numpy()
            slot = np.unique(v >> _ROW_BITS)
            if slot.size != 1:
                raise CompressedTensorsExportError(f"checkpoint weight {key!r} mixes rows of several quantized layers")
            rows[key] = (int(slot[0]), v & ((1 << _ROW_BITS) - 1))
        elif value.dtype == torch.float64:
            raise CompressedTensorsExportError(f"checkpoint tensor {key!r}: a quantized weight is converted in a way "
                                               "that is not a selection of rows")
        else:
            tensors[key] = value
    return tensors, rows


def export_compressed_tensors(model, layers: dict[str, Any], out_dir: str | os.PathLike, *, tokenizer=None,
                              dtype=None, overwrite: bool = False) -> Path:
    """Write a compressed-tensors ``pack-quantized`` checkpoint directory, atomically.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the layers belong to (its config and non-quantized tensors are written).
    layers : dict of str to QuantizedLayer
        Module name (an ``nn.Linear`` or ``Conv1D`` of `model`) or fused expert name
        (``<experts>.<param>.<e>``) to its uniform layer; one ``bits`` (2, 3, 4 or 8) and
        one ``group_size`` for all. Written under the checkpoint names of
        ``save_pretrained`` (:func:`checkpoint_rows`).
    out_dir : str or path-like
        Directory to create (``config.json``, ``model.safetensors``, tokenizer files).
    tokenizer : transformers tokenizer, optional
    dtype : torch.dtype, optional
        dtype of the scales and of the non-quantized floating tensors; default float16.
    overwrite : bool
        Replace an existing `out_dir`.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    CompressedTensorsExportError
        Naming the layers that cannot be written (not uniform, not a Linear/Conv1D or
        fused expert of `model`, a fused weight with some experts left out, mixed bits or
        group sizes, see :func:`compressed_tensors_tensors`).

    Examples
    --------
    >>> import torch, json, tempfile, pathlib
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> from llm_adapter.calibration import quantize_model
    >>> from llm_adapter.methods.uniform import QuantSpec
    >>> windows = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    >>> layers = quantize_model(model, windows, QuantSpec(bits=4, group_size=32, method="rtn"), progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_compressed_tensors(model, layers, pathlib.Path(tmp.name) / "ct")
    >>> qc = json.loads((path / "config.json").read_text())["quantization_config"]
    >>> qc["format"], qc["config_groups"]["group_0"]["weights"]["strategy"], qc["ignore"]
    ('pack-quantized', 'group', ['lm_head'])
    >>> tmp.cleanup()
    """
    import torch
    from safetensors.torch import save_file

    from ..nn.fused import expert_slot, is_conv1d

    dtype = torch.float16 if dtype is None else dtype
    if not isinstance(layers, dict) or not layers:
        raise CompressedTensorsExportError("`layers` must be a non-empty dict of name -> QuantizedLayer")
    target = Path(os.fspath(out_dir))
    if target.exists() and not overwrite:
        raise FileExistsError(f"`out_dir` {str(target)!r} already exists; pass overwrite=True to replace it")
    modules = dict(model.named_modules())
    problems = []
    for name, layer in layers.items():
        mod = modules.get(name)
        try:
            kind = methods.for_layer(layer).format.kind
        except TypeError:
            kind = "unknown"
        if kind != "uniform":
            problems.append(f"{name!r} is a {type(layer).__name__} ({kind}), not a uniform-grid layer")
        elif mod is None and expert_slot(modules, name) is not None:
            emod, param, e = expert_slot(modules, name)
            if tuple(getattr(emod, param).shape[1:]) != tuple(layer.shape):
                problems.append(f"{name!r} has shape {tuple(getattr(emod, param).shape[1:])}, the quantized layer "
                                f"{layer.shape}")
        elif not isinstance(mod, torch.nn.Linear) and not is_conv1d(mod):
            problems.append(f"{name!r} is not an nn.Linear or Conv1D of the model")
        elif (tuple(mod.weight.shape)[::-1] if is_conv1d(mod) else tuple(mod.weight.shape)) != tuple(layer.shape):
            problems.append(f"{name!r} has weight shape {tuple(mod.weight.shape)}, the quantized layer {layer.shape}")
    if problems:
        raise CompressedTensorsExportError("cannot export: " + "; ".join(problems))
    bits_set = {int(l.bits) for l in layers.values()}
    gs_set = {int(l.group_size) for l in layers.values()}
    if len(bits_set) != 1 or len(gs_set) != 1:
        raise CompressedTensorsExportError(
            f"one `bits` and one `group_size` per checkpoint; the layers have bits {sorted(bits_set)} and group "
            f"sizes {sorted(gs_set)}")
    (bits,), (group_size,) = bits_set, gs_set
    half = 1 << (bits - 1)
    sym = all(np.all(np.asarray(l.zeros) == half) for l in layers.values())

    np_dtype = {torch.float16: np.float16, torch.float32: np.float32}.get(dtype)
    # quantized weights by parameter name: a Linear/Conv1D weight is one slot, a fused
    # expert weight (E, rows, in) E slots (expert e = slot first + e)
    slot_layer, quantized, fused = quantized_slots(model, modules, layers, CompressedTensorsExportError)
    skip = {f"{name}.weight" for name in layers if name in modules} | set(fused)
    float_sd, seen_ptrs = {}, set()
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and (ptr, value.storage_offset(), tuple(value.shape)) in seen_ptrs:
            continue  # tied weight: saved once, like save_pretrained
        if ptr is not None:
            seen_ptrs.add((ptr, value.storage_offset(), tuple(value.shape)))
        float_sd[key] = value.detach().cpu()
    plain, rows = checkpoint_rows(model, float_sd, quantized)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        tensors[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    for key, (slot, r) in sorted(rows.items()):
        name, layer = slot_layer[slot]
        sub = layer if np.array_equal(r, np.arange(layer.shape[0])) else row_layer(layer, r)
        try:
            packed = compressed_tensors_tensors(key[:-len(".weight")], sub, scale_dtype=np_dtype or np.float32)
        except CompressedTensorsExportError as err:
            raise CompressedTensorsExportError(f"{name}: {err}") from None
        for k, arr in packed.items():
            if sym and k.endswith(".weight_zero_point"):
                continue
            t = torch.from_numpy(np.ascontiguousarray(arr))
            tensors[k] = t.to(dtype) if k.endswith(".weight_scale") and np_dtype is None else t

    ignore = [n for n, m in modules.items() if (isinstance(m, torch.nn.Linear) or is_conv1d(m)) and n not in layers]
    targets = ["Linear"] + (["Conv1D"] if any(is_conv1d(modules.get(n)) for n in layers) else [])
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["quantization_config"] = compressed_tensors_config(bits=bits, group_size=group_size, sym=sym,
                                                              ignore=ignore, targets=targets)
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name
    if "dtype" in config:
        config["dtype"] = dtype_name

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    path = write_dir_atomically(target, fill, on_exists="replace" if overwrite else "error")
    logger.info("wrote compressed-tensors checkpoint %s: %d layers, %d-bit, group size %d, sym=%s", path,
                len(layers), bits, group_size, sym)
    return path

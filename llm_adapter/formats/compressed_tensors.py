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
transpose); fused MoE experts are not (no layout of this exporter for them yet).
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
from .native import library_version
from .packing import pack

__all__ = ["CompressedTensorsExportError", "compressed_tensors_config", "compressed_tensors_tensors",
           "export_compressed_tensors"]

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


def export_compressed_tensors(model, layers: dict[str, Any], out_dir: str | os.PathLike, *, tokenizer=None,
                              dtype=None, overwrite: bool = False) -> Path:
    """Write a compressed-tensors ``pack-quantized`` checkpoint directory, atomically.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the layers belong to (its config and non-quantized tensors are written).
    layers : dict of str to QuantizedLayer
        Module name (an ``nn.Linear`` or ``Conv1D`` of `model`) to its uniform layer; one
        ``bits`` (2, 3, 4 or 8) and one ``group_size`` for all.
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
        Naming the layers that cannot be written (not uniform, not a Linear/Conv1D of
        `model`, fused experts, mixed bits or group sizes, see :func:`compressed_tensors_tensors`).

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
            problems.append(f"{name!r} is one expert of a fused MoE weight (not supported by this exporter; "
                            "use the native format)")
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
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, arr in compressed_tensors_tensors(name, layer, scale_dtype=np_dtype or np.float32).items():
            if sym and key.endswith(".weight_zero_point"):
                continue
            t = torch.from_numpy(np.ascontiguousarray(arr))
            tensors[key] = t.to(dtype) if key.endswith(".weight_scale") and np_dtype is None else t
    skip = {f"{name}.weight" for name in layers}
    seen_ptrs: set[tuple] = set()
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and (ptr, value.storage_offset(), tuple(value.shape)) in seen_ptrs:
            continue  # tied weight: saved once, like save_pretrained
        if ptr is not None:
            seen_ptrs.add((ptr, value.storage_offset(), tuple(value.shape)))
        value = value.detach().cpu()
        tensors[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous()

    ignore = [n for n, m in modules.items() if (isinstance(m, torch.nn.Linear) or is_conv1d(m)) and n not in layers]
    targets = ["Linear"] + (["Conv1D"] if any(is_conv1d(modules[n]) for n in layers) else [])
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

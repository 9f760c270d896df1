"""An independent reader of GPTQ checkpoints, written from the published layout only.

It shares no code with :mod:`llm_adapter.formats` (no ``unpack``): the packed words are
turned into their little-endian bytes and then into a bit stream with
``numpy.unpackbits(..., bitorder="little")``, and value ``k`` is bits ``[b*k, b*k+b)`` of
that stream — which is the layout AutoGPTQ's ``pack`` produces (``qweight`` streams run
down the input dim per output column, ``qzeros`` streams along the output dim per
group). Then, as every v1 reader does, ``zero = stored + 1`` (no wrap-around), and

    W[j, i] = scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j])

computed in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REQUIRED_QCONFIG = ("quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential")


def _stream_values(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Words (n_words, cols) -> values (n, cols): each column is one little-endian stream."""
    w = np.ascontiguousarray(words.T).astype("<u4")  # (cols, n_words)
    stream = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")  # (cols, n_words * 32)
    assert stream.shape[1] >= n * bits, "not enough packed bits"
    b = stream[:, : n * bits].reshape(w.shape[0], n, bits).astype(np.int64)
    values = (b << np.arange(bits)).sum(axis=2)  # (cols, n)
    return values.T


def read_gptq(directory) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read a GPTQ checkpoint directory.

    Returns
    -------
    config : dict
        ``config.json``.
    weights : dict
        ``<name>`` -> dequantized float32 ``(out, in)`` weight of every quantized linear.
    tensors : dict
        Every stored tensor, as read.
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    q = config["quantization_config"]
    for key in REQUIRED_QCONFIG:
        assert key in q, f"quantization_config lacks {key}"
    assert q["quant_method"] == "gptq"
    bits, group_size = q["bits"], q["group_size"]
    v2 = q.get("checkpoint_format", q.get("format", "gptq")) == "gptq_v2"
    tensors = load_file(str(directory / "model.safetensors"))
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qweight = tensors[f"{name}.qweight"]
        qzeros = tensors[f"{name}.qzeros"]
        scales = tensors[f"{name}.scales"]
        g_idx = tensors[f"{name}.g_idx"]
        assert qweight.dtype == np.int32 and qzeros.dtype == np.int32
        assert scales.dtype == np.float16 and g_idx.dtype == np.int32
        n_in = qweight.shape[0] * 32 // bits
        n_out = qweight.shape[1]
        n_groups = scales.shape[0]
        assert scales.shape == (n_groups, n_out)
        assert qzeros.shape == (n_groups, n_out * bits // 32)
        assert g_idx.shape == (n_in,)
        if group_size == -1:
            assert n_groups == 1
        else:
            assert n_groups == -(-n_in // group_size)
        codes = _stream_values(qweight, bits, n_in)  # (in, out)
        stored = _stream_values(qzeros.T, bits, n_out).T  # (groups, out)
        zeros = stored if v2 else stored + 1
        s = scales.astype(np.float32)[g_idx].T  # (out, in)
        z = zeros.astype(np.float32)[g_idx].T
        weights[name] = s * (codes.T.astype(np.float32) - z)
    return config, weights, tensors

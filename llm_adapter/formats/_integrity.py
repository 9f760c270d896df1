"""SHA-256 digests of stored tensors and JSON documents (integrity checks on load).

A tensor's digest covers its dtype, its shape and its bytes (C order, as stored), so a
flipped byte in the data, and a header edit that reinterprets the same bytes with another
shape or dtype, both change it. A JSON document's digest is that of its canonical text
(sorted keys, no whitespace), so it survives re-indentation but not a changed value.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

__all__ = ["ALGORITHM", "json_digest", "tensor_digest", "torch_digest"]

ALGORITHM = "sha256"


def tensor_digest(a) -> str:
    """Hex SHA-256 of ``dtype|shape|bytes`` of array `a`.

    Examples
    --------
    >>> import numpy as np
    >>> d = tensor_digest(np.arange(4, dtype=np.int32))
    >>> len(d), d == tensor_digest(np.arange(4, dtype=np.int32).reshape(2, 2))
    (64, False)
    """
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}|{list(a.shape)}|".encode())
    if a.size:
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def json_digest(obj) -> str:
    """Hex SHA-256 of the canonical JSON text of `obj` (sorted keys, compact).

    Examples
    --------
    >>> json_digest({"a": 1, "b": [1.5]}) == json_digest({"b": [1.5], "a": 1})
    True
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def torch_digest(t) -> str:
    """Hex SHA-256 of ``dtype|shape|bytes`` of torch tensor `t` (any dtype, bf16 included;
    the dtype is written as torch names it, e.g. ``torch.float16``)."""
    import torch

    c = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{c.dtype}|{list(c.shape)}|".encode())
    if c.numel():
        h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()

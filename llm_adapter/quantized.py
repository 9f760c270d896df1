"""The in-memory result of quantizing one linear layer with a uniform integer grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["QuantizedLayer"]


@dataclass
class QuantizedLayer:
    """Codes and grid of one quantized linear layer ``W`` (out_features, in_features).

    Dequantization: ``W[j, i] = scales[j, g_idx[i]] * (codes[j, i] - zeros[j, g_idx[i]])``.

    Attributes
    ----------
    codes : (out, in) ndarray of uint8
        Integer codes in ``[0, 2**bits - 1]``, original column order.
    scales : (out, n_groups) ndarray of float32
        Positive step per output row and group.
    zeros : (out, n_groups) ndarray of float32
        Integer-valued zero points (code units).
    g_idx : (in,) ndarray of int32
        Group of each input column (``i // group_size`` for static groups).
    bits : int
        2, 3 or 4 (8 also accepted by the packers).
    group_size : int
        Columns per group, or -1 for one group per row (per-channel).
    perm : (in,) ndarray of int64 or None
        Decision order used by the solver (act-order), for information.
    bias : (out,) ndarray or None
        Bias of the original module, kept in float.
    stats : dict
        Per-layer diagnostics: ``loss``, ``rel_loss``, ``babai_bound``,
        ``clipped_frac``, ``time``, ``method``.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.quantized import QuantizedLayer
    >>> q = QuantizedLayer(codes=np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8),
    ...                    scales=np.array([[0.5], [0.25]], dtype=np.float32),
    ...                    zeros=np.array([[1.0], [2.0]], dtype=np.float32),
    ...                    g_idx=np.zeros(4, dtype=np.int32), bits=2, group_size=-1)
    >>> q.shape
    (2, 4)
    >>> q.dequantize().tolist()  # scales * (codes - zeros), row by row
    [[-0.5, 0.0, 0.5, 1.0], [0.25, 0.0, -0.25, -0.5]]
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    bits: int
    group_size: int
    perm: np.ndarray | None = None
    bias: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """Float weights ``(out, in)``."""
        s = self.scales[:, self.g_idx]
        z = self.zeros[:, self.g_idx]
        return (s * (self.codes.astype(np.float32) - z)).astype(dtype)

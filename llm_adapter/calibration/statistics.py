r"""Calibration statistics of one linear layer, accumulated batch by batch (pure torch maths).

.. math::

    H = \sum \tilde x \tilde x^\top, \qquad D = \sum (x - \tilde x)\,\tilde x^\top ,

summed over tokens, :math:`\tilde x` the layer's input when the earlier layers are already
quantized and :math:`x` the float model's. With per-sequence :math:`\alpha_s` (regcal's
``alpha="sample"``) the rows of :math:`x - \tilde x` of sequence :math:`s` are scaled by
:math:`\alpha_s` (folded into ``D``). Products in float32 per batch; the sums are float64
on the host (the default) and float32 on an accelerator (``device=..., dtype=torch.float32``,
what :func:`~llm_adapter.calibration.quantize_model` uses with ``device=``: float64 is
slow on most GPUs and is only needed for the factorisation, :meth:`LayerStatistics.mean_tensors`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LayerStatistics"]


class LayerStatistics:
    """Running ``H`` (and ``D``) of one layer with `n_in` inputs.

    Parameters
    ----------
    n_in : int
        Input features of the layer.
    joint : bool
        Accumulate ``D`` too (needs the float inputs in :meth:`add`).
    alphas : (n_sequences,) torch.Tensor, optional
        Per-sequence α folded into ``D``.
    device : torch.device or str, optional
        Where the sums live (default: the CPU). Batches added must be on it.
    dtype : torch.dtype
        Dtype of the sums: float64 (default) or float32.

    Examples
    --------
    >>> import torch
    >>> st = LayerStatistics(2, joint=True)
    >>> xq = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # 1 sequence, 2 tokens
    >>> st.add(xq, xq + 1.0, seq=0)
    >>> H, D = st.mean(2)
    >>> H.tolist(), D.tolist()
    ([[0.5, 0.0], [0.0, 2.0]], [[0.5, 1.0], [0.5, 1.0]])
    """

    def __init__(self, n_in: int, *, joint: bool, alphas: torch.Tensor | None = None, device=None,
                 dtype: torch.dtype = torch.float64):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype!r}")
        self.H = torch.zeros(n_in, n_in, dtype=dtype, device=device)
        self.D = torch.zeros(n_in, n_in, dtype=dtype, device=device) if joint else None
        self.alphas = None if alphas is None else alphas.to(self.H.device)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None, *, seq: int = 0) -> None:
        """Add a batch: `x` (n_seq, ..., n_in) quantized-model inputs, `x_float` the float
        model's (any shape with the same rows), `seq` the index of the batch's first sequence."""
        nb, width = x.shape[0], x.shape[-1]
        x = x.reshape(-1, width).float()
        self.H.add_((x.T @ x).to(self.H.dtype))
        if self.D is not None:
            dx = x_float.reshape(-1, width).float() - x
            if self.alphas is not None:
                a = self.alphas[seq:seq + nb]
                dx = dx * a.repeat_interleave(x.shape[0] // nb)[:, None]
            self.D.add_((dx.T @ x).to(self.H.dtype))

    def mean(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(H / n_tokens, D / n_tokens)`` as float64 numpy arrays (``D`` None unless joint)."""
        H, D = self.mean_tensors(n_tokens)
        return H.cpu().numpy(), None if D is None else D.cpu().numpy()

    def mean_tensors(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(H / n_tokens, D / n_tokens)`` as float64 tensors where the sums live."""
        H = self.H.double() / n_tokens
        return H, None if self.D is None else self.D.double() / n_tokens

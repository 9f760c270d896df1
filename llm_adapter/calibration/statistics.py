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

``H`` is symmetric: on the host its per-batch product is a symmetric rank-k update
(BLAS ``ssyrk`` through SciPy, ``gram="syrk"``, the default where the sums live on the
CPU), which computes the upper triangle only, half the flops of the full float32 product
(``gram="matmul"``, what an accelerator uses). Both are float32 products accumulated in
float32 inside the BLAS call, so they differ only by the order of the roundings (relative
error of either against the float64 product about 2e-7, see docs/performance.md); the
running sum holds the upper triangle and :meth:`LayerStatistics.mean_tensors` mirrors it.

Shrinkage of ``D`` by its noise (``d_shrink``): the sequences are split in two folds by
the parity of their index, :math:`D = D_0 + D_1`. With :math:`\bar D_f = D_f / N_f` the
per-token means of the folds, :math:`v = ((\bar D_0 - \bar D_1)/2)^2` estimates the
variance of the mean :math:`\bar D = D / N` entry by entry (one degree of freedom), and
the returned mean is shrunk toward 0 (positive-part James-Stein):
``"layer"``: :math:`\bar D \max(0, 1 - \sum v / \sum \bar D^2)`;
``"entry"``: :math:`\bar D \odot \max(0, 1 - v / \bar D^2)`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LayerStatistics", "gram_update", "shrink_d"]

#: Rules of :func:`shrink_d`.
SHRINKS = ("layer", "entry")
#: Ways of forming the per-batch product of ``H`` (:class:`LayerStatistics`'s ``gram``).
GRAMS = ("auto", "syrk", "matmul")


def gram_update(x: torch.Tensor, scratch: np.ndarray) -> torch.Tensor:
    r"""Upper triangle of :math:`x^\top x` for a float32 CPU `x` (N, n), by BLAS ``ssyrk``.

    Parameters
    ----------
    x : (N, n) torch.Tensor
        float32, on the CPU, C-contiguous.
    scratch : (n, n) numpy.ndarray
        float32, Fortran order, zero below the diagonal: overwritten with the product's
        upper triangle (the lower one is never written, so it stays zero).

    Returns
    -------
    (n, n) torch.Tensor
        A view of `scratch`: :math:`\operatorname{triu}(x^\top x)`, zero below the diagonal.

    Examples
    --------
    >>> import numpy as np, torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> gram_update(x, np.zeros((2, 2), np.float32, order="F")).tolist()
    [[10.0, 14.0], [0.0, 20.0]]
    """
    from scipy.linalg.blas import ssyrk

    a = x.detach().numpy()
    # row-major x (N, n) is the column-major (n, N) matrix x^T: ssyrk's A A^T = x^T x
    c = ssyrk(1.0, a.T, beta=0.0, c=scratch, trans=0, lower=0, overwrite_c=1)
    if c is not scratch and not np.shares_memory(c, scratch):  # pragma: no cover - f2py copied
        scratch[...] = c
    return torch.from_numpy(scratch)


def shrink_d(D0, D1, n0, n1, rule):
    r"""``(D0 + D1) / (n0 + n1)`` shrunk toward 0 by the noise seen between the two folds.

    Parameters
    ----------
    D0, D1 : (n, n) torch.Tensor
        Sums of :math:`\Delta x\, \tilde x^\top` over the tokens of each fold.
    n0, n1 : int
        Tokens in each fold (both > 0).
    rule : {"layer", "entry"}
        One factor for the whole matrix, or one per entry (see the module docstring).

    Returns
    -------
    (n, n) torch.Tensor
        The shrunk mean, float64.

    Examples
    --------
    >>> import torch
    >>> D0 = torch.tensor([[2.0, 1.0]]); D1 = torch.tensor([[2.0, -1.0]])  # entry 2 is noise
    >>> shrink_d(D0, D1, 1, 1, "entry").tolist()
    [[2.0, 0.0]]
    """
    if rule not in SHRINKS:
        raise ValueError(f"`rule` must be one of {SHRINKS}, got {rule!r}")
    if n0 <= 0 or n1 <= 0:
        raise ValueError(f"both folds need tokens, got n0={n0}, n1={n1}")
    D0, D1 = D0.double(), D1.double()
    mean = (D0 + D1) / (n0 + n1)
    v = ((D0 / n0 - D1 / n1) / 2) ** 2
    if rule == "layer":
        sig = float((mean ** 2).sum())
        return mean * (max(0.0, 1.0 - float(v.sum()) / sig) if sig > 0 else 0.0)
    sq = mean ** 2
    factor = torch.where(sq > 0, torch.clamp(1.0 - v / torch.where(sq > 0, sq, 1.0), min=0.0),
                         torch.zeros_like(sq))
    return mean * factor


class LayerStatistics:
    r"""Running ``H`` (and ``D``) of one layer with `n_in` inputs.

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
    d_shrink : None, "layer" or "entry"
        Keep ``D`` in two folds (sequence parity) and shrink its mean by the fold noise
        (:func:`shrink_d`).
    gram : {"auto", "syrk", "matmul"}
        How each batch's :math:`\tilde x^\top \tilde x` is formed: ``"syrk"`` the upper
        triangle by BLAS ``ssyrk`` (CPU only; half the flops), ``"matmul"`` the full float32
        product (torch), ``"auto"`` (default) ``"syrk"`` on the CPU, else ``"matmul"``.

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
                 dtype: torch.dtype = torch.float64, d_shrink: str | None = None, gram: str = "auto"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype!r}")
        if gram not in GRAMS:
            raise ValueError(f"`gram` must be one of {GRAMS}, got {gram!r}")
        self.H = torch.zeros(n_in, n_in, dtype=dtype, device=device)
        on_cpu = self.H.device.type == "cpu"
        if gram == "syrk" and not on_cpu:
            raise ValueError(f"`gram`='syrk' needs the sums on the CPU, got device {self.H.device}")
        self.gram = "syrk" if gram == "auto" and on_cpu else ("matmul" if gram == "auto" else gram)
        # H holds the upper triangle only with syrk (mirrored in mean_tensors)
        self._scratch = np.zeros((n_in, n_in), np.float32, order="F") if self.gram == "syrk" else None
        self.D = torch.zeros(n_in, n_in, dtype=dtype, device=device) if joint else None
        self.alphas = None if alphas is None else alphas.to(self.H.device)
        if d_shrink is not None and d_shrink not in SHRINKS:
            raise ValueError(f"`d_shrink` must be None or one of {SHRINKS}, got {d_shrink!r}")
        self.d_shrink = d_shrink if joint else None
        # fold 1 (odd sequences) kept apart: D holds fold 0 then, D1 fold 1
        self.D1 = torch.zeros_like(self.D) if self.d_shrink else None
        self.fold_tokens = [0, 0]

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None, *, seq: int = 0) -> None:
        """Add a batch: `x` (n_seq, ..., n_in) quantized-model inputs, `x_float` the float
        model's (any shape with the same rows), `seq` the index of the batch's first sequence."""
        nb, width = x.shape[0], x.shape[-1]
        x = x.reshape(-1, width).float()
        if self._scratch is not None:
            self.H.add_(gram_update(x.contiguous(), self._scratch))
        else:
            self.H.add_((x.T @ x).to(self.H.dtype))
        if self.D is not None:
            dx = x_float.reshape(-1, width).float() - x
            if self.alphas is not None:
                a = self.alphas[seq:seq + nb]
                dx = dx * a.repeat_interleave(x.shape[0] // nb)[:, None]
            if self.D1 is None:
                self.D.add_((dx.T @ x).to(self.H.dtype))
            else:
                per = x.shape[0] // nb
                odd = ((torch.arange(nb, device=x.device) + seq) % 2 == 1).repeat_interleave(per)
                for fold, sel, target in ((0, ~odd, self.D), (1, odd, self.D1)):
                    if bool(sel.any()):
                        target.add_((dx[sel].T @ x[sel]).to(self.H.dtype))
                        self.fold_tokens[fold] += int(sel.sum())

    def mean(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(H / n_tokens, D / n_tokens)`` as float64 numpy arrays (``D`` None unless joint)."""
        H, D = self.mean_tensors(n_tokens)
        return H.cpu().numpy(), None if D is None else D.cpu().numpy()

    def mean_tensors(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(H / n_tokens, D / n_tokens)`` as float64 tensors where the sums live."""
        H = self.H.double() / n_tokens
        if self._scratch is not None:  # the upper triangle: mirror it
            H = H.triu() + H.triu(1).T
        if self.D is None:
            return H, None
        if self.D1 is None:
            return H, self.D.double() / n_tokens
        n0, n1 = self.fold_tokens
        if n0 == 0 or n1 == 0:  # one sequence: no noise estimate, D unshrunk
            return H, (self.D.double() + self.D1.double()) / n_tokens
        # the folds' means are per fold token; rescale to the caller's normalisation
        return H, shrink_d(self.D, self.D1, n0, n1, self.d_shrink) * ((n0 + n1) / n_tokens)

"""Perplexity with the GPTQ protocol: non-overlapping windows, mean token NLL."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

__all__ = ["PerplexityResult", "perplexity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes
    ----------
    ppl : float
        Perplexity, ``exp(nll)``.
    nll : float
        Mean negative log-likelihood per scored token, in nats.
    n_tokens : int
        Number of scored tokens: ``n_windows * (width - 1)``.

    Examples
    --------
    A model whose predictions are uniform over a vocabulary of 64 tokens has perplexity
    64 on any text:

    >>> import math, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(  # a tiny random Llama: nothing is downloaded
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> _ = torch.nn.init.zeros_(model.lm_head.weight)  # all logits 0: uniform
    >>> windows = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    >>> res = perplexity(model, windows, progress=False)
    >>> round(res.ppl, 4), res.n_tokens, abs(res.nll - math.log(64)) < 1e-6
    (64.0, 24, True)
    """

    ppl: float
    nll: float
    n_tokens: int


def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 8, device=None, progress: bool = True
) -> PerplexityResult:
    """Perplexity of a causal LM on token windows.

    Each row ``x`` of `windows` (from :func:`llm_adapter.data.evaluation_windows`) is
    scored as a whole: the model sees ``x`` once, and every token ``x[t]``, ``t >= 1``,
    is predicted from ``x[:t]``; ``x[0]`` (the BOS) is context only, never a target.

    .. math::

        \\mathrm{nll} = -\\frac{1}{N} \\sum_{i} \\sum_{t=1}^{T-1}
            \\log p(x_{i,t} \\mid x_{i,<t}), \\qquad
        \\mathrm{ppl} = e^{\\mathrm{nll}}, \\qquad N = n_{\\mathrm{windows}} (T - 1).

    Parameters
    ----------
    model : transformers causal LM
        Called as ``model(input_ids=batch, use_cache=False)``; must return ``.logits``
        of shape ``(batch, T, vocab)``. Evaluated in eval mode (its training flag is
        restored afterwards) without gradients.
    windows : (n_windows, T) integer torch.Tensor
        Token ids, ``T >= 2``.
    batch_size : int
        Windows per forward pass.
    device : torch.device or str, optional
        Where the batches are sent; default the device of the model's input embeddings
        (its first parameter's for other models).
    progress : bool
        Show a tqdm progress bar (on stderr).

    Returns
    -------
    PerplexityResult

    Raises
    ------
    ValueError
        If `windows` is not a 2-D integer tensor with at least two columns, or
        `batch_size` is not positive.

    Notes
    -----
    The log-probabilities are computed in float32 (float64 accumulation) whatever
    the model's dtype. Memory is dominated by the logits, ``batch_size * T * vocab``
    floats.

    Examples
    --------
    >>> model, tok = load_model()  # doctest: +SKIP
    >>> text = load_text("shakespeare", split="evaluation")  # doctest: +SKIP
    >>> perplexity(model, evaluation_windows(tok, text)).ppl  # doctest: +SKIP
    40.95...
    """
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2:
        raise ValueError(
            f"`windows` must be a 2-D torch.Tensor (n_windows, T), got "
            f"{getattr(windows, 'shape', type(windows).__name__)}"
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"`windows` must hold integer token ids, got dtype {windows.dtype}")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(
            f"`windows` must have at least one row and two columns (BOS + a target), "
            f"got shape {tuple(windows.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if device is None:
        device = _input_device(model)

    from tqdm.auto import tqdm

    n_windows, width = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(
            total=n_windows, desc="perplexity", unit="window", disable=not progress
        ) as bar:
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(input_ids=batch, use_cache=False).logits
                total += _nll_sum(logits[:, :-1], batch[:, 1:]).cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    n_tokens = n_windows * (width - 1)
    nll = total.item() / n_tokens
    result = PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens)
    logger.info("perplexity %.4f (mean NLL %.5f over %d tokens)", result.ppl, nll, n_tokens)
    return result


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log softmax(logits)[target], one row at a time to bound memory."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row_logits, row_targets in zip(logits, targets):
        nll = torch.nn.functional.cross_entropy(row_logits.float(), row_targets, reduction="none")
        total += nll.double().sum()
    return total


def _input_device(model) -> torch.device:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        embeddings = get_embeddings()
        if embeddings is not None and getattr(embeddings, "weight", None) is not None:
            return embeddings.weight.device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")

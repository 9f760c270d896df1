r"""Fused mixture-of-experts weights: discovery and per-expert calibration statistics.

In transformers 5 the experts of a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, ...)
are one module holding two 3-D parameters,

==============  ==============  ==================================================
parameter       shape           per expert ``e``
==============  ==============  ==================================================
gate_up_proj    (E, 2I, H)      ``[gate; up] = W_gu[e] x``  (first ``I`` rows: gate)
down_proj       (E, H, I)       ``y = W_d[e] (act(gate) * up)``
==============  ==============  ==================================================

called as ``experts(hidden (N, H), top_k_index (N, k), top_k_weights (N, k))``. Each
fused weight is an :class:`ExpertsPart`; it stands for ``E`` quantized layers named
``<experts module>.<parameter>.<e>`` (e.g. ``model.layers.0.mlp.experts.down_proj.3``),
each of shape ``(2I, H)`` or ``(H, I)``, quantized with the statistics of the tokens
routed to that expert:

.. math::

    H_e = \frac{1}{n_e} \sum_{t \,:\, e \in \mathrm{topk}(t)} x_t x_t^\top ,

where :math:`x_t` is the hidden state of token ``t`` (``gate_up_proj``) or the expert's
own intermediate :math:`\mathrm{act}(g_t) \odot u_t` computed with its current (already
quantized, in true-sequential mode) ``gate_up_proj[e]`` (``down_proj``). They are
captured by a forward pre-hook on the experts module, which sees the routing (no
per-Linear hooks: there are none).

Fallback: an expert routed fewer than ``min_tokens`` calibration tokens uses the shared
pre-routing statistics instead, i.e. every token reaching the experts module treated as
routed to it (``gate_up_proj``: the Gram of all hidden states; ``down_proj``: the Gram of
its intermediate on all tokens). ``stats["tokens"]`` records the routed count and
``stats["fallback"]`` whether the fallback was used. The router stays in float (it is not
a linear layer in transformers 5 and is never selected). Joint methods get ``D = None``
(α = 0) for experts: the float and quantized streams route tokens differently.
"""

from __future__ import annotations

import torch

__all__ = ["ExpertsPart", "ExpertsStatistics", "MIN_EXPERT_TOKENS", "experts_parts"]

#: Default: experts routed fewer calibration tokens than this use the shared pre-routing statistics.
MIN_EXPERT_TOKENS = 16

_PARAMS = ("gate_up_proj", "down_proj")


class ExpertsPart:
    """One fused 3-D expert weight of an experts module: ``E`` linear layers ``(out, in)``.

    Parameters
    ----------
    module : torch.nn.Module
        The experts module (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), ``act_fn``).
    name : str
        Full name of the experts module in the model.
    param : {"gate_up_proj", "down_proj"}

    Examples
    --------
    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    >>> parts, _ = experts_parts(model.model.layers[0].mlp.experts, "model.layers.0.mlp.experts")
    >>> [(p.name, p.n_experts, p.shape) for p in parts]
    [('model.layers.0.mlp.experts.gate_up_proj', 4, (32, 32)), ('model.layers.0.mlp.experts.down_proj', 4, (32, 16))]
    >>> parts[1].layer_name(3)
    'model.layers.0.mlp.experts.down_proj.3'
    """

    def __init__(self, module, name: str, param: str):
        if param not in _PARAMS:
            raise ValueError(f"`param` must be one of {_PARAMS}, got {param!r}")
        self.module, self.experts_name, self.param = module, name, param
        self.name = f"{name}.{param}"

    @property
    def tensor(self) -> torch.nn.Parameter:
        return getattr(self.module, self.param)

    @property
    def n_experts(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of one expert's layer."""
        return tuple(int(v) for v in self.tensor.shape[1:])

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def layer_name(self, e: int) -> str:
        return f"{self.name}.{e}"

    def weight(self, e: int) -> torch.Tensor:
        """Expert `e`'s ``(out, in)`` weight (a view)."""
        return self.tensor[e]

    def set_weight(self, e: int, W: torch.Tensor) -> None:
        with torch.no_grad():
            self.tensor[e].copy_(W.to(self.tensor.dtype))

    def inputs(self, hidden: torch.Tensor, rows: torch.Tensor, e: int) -> torch.Tensor:
        """Inputs of expert `e`'s layer for the tokens `rows` of `hidden` (N, H)."""
        x = hidden[rows]
        if self.param == "gate_up_proj":
            return x
        gate, up = torch.nn.functional.linear(x, self.module.gate_up_proj[e]).chunk(2, dim=-1)
        return self.module.act_fn(gate) * up

    def __repr__(self):
        return f"ExpertsPart({self.name!r}, experts={self.n_experts}, shape={self.shape})"


def experts_parts(module, name: str):
    """The fused expert weights of `module` as :class:`ExpertsPart` s, and the reasons why
    other 3-D weights of it cannot be handled (``{param: reason}``).

    A module is a fused-experts module when it has a 3-D ``gate_up_proj`` (E, 2I, H) and a
    3-D ``down_proj`` (E, H, I) of matching sizes, an ``act_fn`` and no expert biases
    (the layout of transformers 5's Mixtral / Qwen-MoE experts). Other layouts (biases,
    transposed or interleaved weights) are reported, not guessed.
    """
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.nn.Parameter) or not isinstance(down, torch.nn.Parameter):
        return [], {}
    why = None
    if gu.ndim != 3 or down.ndim != 3:
        why = "not 3-D"
    elif not (gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1]):
        why = (f"fused experts of unsupported layout gate_up_proj {tuple(gu.shape)}, down_proj "
               f"{tuple(down.shape)} (expected (E, 2I, H) and (E, H, I))")
    elif not hasattr(module, "act_fn"):
        why = "fused experts without `act_fn`"
    elif any(getattr(module, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")) \
            or getattr(module, "has_bias", False) or getattr(module, "is_transposed", False):
        why = "fused experts with biases or transposed weights (unsupported layout)"
    if why is not None:
        return [], {p: why for p in _PARAMS}
    return [ExpertsPart(module, name, p) for p in _PARAMS], {}


class ExpertsStatistics:
    """Per-expert Gram sums of one :class:`ExpertsPart`, routed and (for short experts) shared.

    :meth:`add` takes the experts module's call arguments; ``only`` restricts the experts
    accumulated and ``all_tokens`` treats every token as routed (the fallback pass).
    """

    def __init__(self, part: ExpertsPart):
        n = part.in_features
        self.part = part
        self.H = [torch.zeros(n, n, dtype=torch.float64) for _ in range(part.n_experts)]
        self.count = [0] * part.n_experts
        self.fallback_H = {}
        self.n_all = 0

    def add(self, hidden, top_k_index, *, all_tokens=False, only=None):
        hidden = hidden.reshape(-1, hidden.shape[-1])
        idx = top_k_index.reshape(hidden.shape[0], -1)
        experts = range(self.part.n_experts) if only is None else only
        if all_tokens:
            self.n_all += hidden.shape[0]
        for e in experts:
            rows = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device) if all_tokens \
                else (idx == e).any(dim=-1)
            k = int(rows.sum())
            if k == 0:
                continue
            x = self.part.inputs(hidden, rows, e).float()
            g = (x.T @ x).double().cpu()
            if all_tokens:
                self.fallback_H.setdefault(e, torch.zeros_like(self.H[e])).add_(g)
            else:
                self.H[e].add_(g)
                self.count[e] += k

    def short(self, min_tokens: int) -> list[int]:
        """Experts routed fewer than `min_tokens` tokens."""
        return [e for e, c in enumerate(self.count) if c < min_tokens]

    def mean(self, e: int, min_tokens: int):
        """``(H_e / n_e, fallback used)`` as numpy; the shared statistics when short."""
        if self.count[e] < min_tokens:
            if e not in self.fallback_H or self.n_all == 0:
                raise RuntimeError(f"{self.part.layer_name(e)}: no fallback statistics were collected")
            return (self.fallback_H[e] / self.n_all).numpy(), True
        return (self.H[e] / self.count[e]).numpy(), False

"""Model structure for calibration: the decoder blocks, the selected linear layers, the
inputs reaching the first block, and the groups of layers that read the same input.

The block list is found generically (the longest :class:`torch.nn.ModuleList`) and layers
are chosen by :func:`fnmatch` patterns on their names (full or block-relative): no code
per model family.
"""

from __future__ import annotations

import fnmatch

import torch

from ..errors import ParameterError
from .hooks import forward_pre_hooks

__all__ = ["StopForward", "find_blocks", "select_linears", "first_block_inputs", "run_block", "layer_groups"]


def find_blocks(model):
    """``(name, ModuleList)`` of the model's decoder blocks: its longest ModuleList.

    Parameters
    ----------
    model : torch.nn.Module
        Typically a transformers causal LM.

    Returns
    -------
    name : str
        The ModuleList's name in ``model.named_modules()`` (first one on ties).
    blocks : torch.nn.ModuleList

    Raises
    ------
    ValueError
        If `model` has no non-empty ModuleList.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(  # a tiny random Llama: nothing is downloaded
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> name, blocks = find_blocks(model)
    >>> name, len(blocks), type(blocks[0]).__name__
    ('model.layers', 2, 'LlamaDecoderLayer')
    >>> find_blocks(torch.nn.Linear(4, 4))
    Traceback (most recent call last):
        ...
    ValueError: `model` has no torch.nn.ModuleList of blocks
    """
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError("`model` has no torch.nn.ModuleList of blocks")
    return best


def select_linears(model, targets=("*",), exclude=("lm_head", "*.lm_head")):
    """Linear layers inside the decoder blocks whose name matches ``targets``.

    Returns ``{block index: {full name: module}}`` (in registration order). A pattern
    matches either the full name (``model.layers.3.self_attn.q_proj``) or the name inside
    the block (``self_attn.q_proj``); ``exclude`` patterns are removed afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Its blocks are found with :func:`find_blocks`.
    targets : str or sequence of str, default ("*",)
        :func:`fnmatch.fnmatchcase` patterns of the layers to keep.
    exclude : str or sequence of str, default ("lm_head", "*.lm_head")
        Patterns of layers to drop from the selection.

    Returns
    -------
    dict of int to dict of str to torch.nn.Linear
        Blocks with no selected layer are left out.

    Raises
    ------
    ValueError
        "no module matched `targets`" when nothing is selected.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(  # a tiny random Llama: nothing is downloaded
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> sel = select_linears(model, targets="self_attn.*", exclude="*.o_proj")
    >>> list(sel), list(sel[0])[0]
    ([0, 1], 'model.layers.0.self_attn.q_proj')
    >>> [name.rsplit(".", 1)[-1] for name in sel[1]]
    ['q_proj', 'k_proj', 'v_proj']
    >>> list(select_linears(model, "model.layers.1.mlp.down_proj")[1])
    ['model.layers.1.mlp.down_proj']
    >>> select_linears(model, "attn.q_proj")
    Traceback (most recent call last):
        ...
    llm_adapter.errors.ParameterError: no module matched `targets` ('attn.q_proj',) (blocks: 'model.layers')
    """
    if isinstance(targets, str):
        targets = (targets,)
    if isinstance(exclude, str):
        exclude = (exclude,)
    blocks_name, blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        sel = {}
        for rel, mod in block.named_modules():
            if not isinstance(mod, torch.nn.Linear) or not rel:
                continue
            full = f"{blocks_name}.{i}.{rel}" if blocks_name else f"{i}.{rel}"
            if not any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in targets):
                continue
            if any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in exclude):
                continue
            sel[full] = mod
        if sel:
            out[i] = sel
    if not out:
        raise ParameterError("targets", f"no module matched `targets` {tuple(targets)} (blocks: {blocks_name!r})")
    return out


class StopForward(Exception):
    """Raised inside a forward pass to stop it; carries what was captured (block inputs)."""

    def __init__(self, args=None, kwargs=None):
        super().__init__("captured")
        self.block_args, self.block_kwargs = args, kwargs


class _Catcher(torch.nn.Module):
    """Stands in for the first block and raises with its inputs (GPTQ's Catcher)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args, **kwargs):
        raise StopForward(args, kwargs)


def first_block_inputs(model, blocks, windows, batch_size, device):
    """Per batch of `windows`: (hidden states, other positional args, kwargs) reaching block 0.

    The first block is swapped for a stand-in that raises with its inputs (GPTQ's Catcher),
    so the exact keyword arguments the model passes (attention mask, rotary embeddings)
    are captured; the block is put back in ``finally``."""
    inps = []
    first = blocks[0]
    blocks[0] = _Catcher(first)
    try:
        for b0 in range(0, windows.shape[0], batch_size):
            batch = windows[b0:b0 + batch_size].to(device=device, dtype=torch.long)
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward as caught:
                args, kwargs = caught.block_args, dict(caught.block_kwargs)
                if args:
                    hidden, rest = args[0], args[1:]
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                kwargs["use_cache"] = False
                kwargs.pop("past_key_values", None)
                kwargs.pop("past_key_value", None)
                inps.append((hidden, rest, kwargs))
            else:
                raise RuntimeError("the model never called its first block")
    finally:
        blocks[0] = first
    return inps


def run_block(block, hidden, rest, kwargs):
    """``block(hidden, *rest, **kwargs)``, its hidden-state output."""
    out = block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_groups(block, layers, probe):
    """Split ``layers`` into groups reading the same input tensor, in execution order."""
    seen = []
    with forward_pre_hooks(layers, lambda name, m, args: seen.append((name, args[0]))):
        run_block(block, *probe)
    groups = []
    for name, x in seen:
        if any(name in g for g, _ in groups):
            continue  # a layer called twice: keep its first call
        if groups and groups[-1][1] is x:
            groups[-1][0].append(name)
        else:
            groups.append(([name], x))
    missing = [n for n in layers if not any(n in g for g, _ in groups)]
    if missing:
        raise RuntimeError(f"layers never called by their block: {missing}")
    return [g for g, _ in groups]

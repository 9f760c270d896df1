"""Model structure for calibration: the decoder blocks, the selected linear layers, the
inputs reaching the first block, and the groups of layers that read the same input.

The block list is found from the model's own structure (its ``_no_split_modules`` block
class, the config's number of layers, ``base_model_prefix``), layers are ``nn.Linear``,
transformers ``Conv1D`` and the fused 3-D expert weights of mixture-of-experts blocks
(:mod:`.experts`), chosen by :func:`fnmatch` patterns on their names (full or
block-relative), and the true-sequential groups come from the block's data flow (layers
called on the same tensor): no code per model family.
"""

from __future__ import annotations

import fnmatch
import logging

import torch

from ..errors import ParameterError
from ..nn.fused import is_conv1d
from .hooks import forward_pre_hooks

__all__ = ["DEFAULT_EXCLUDE", "StopForward", "find_blocks", "first_block_inputs", "is_conv1d", "is_linear",
           "layer_groups", "linear_in_features", "linear_weight", "run_block", "select_linears", "set_linear_weight"]

logger = logging.getLogger("llm_adapter.calibration")

#: Layers left in float by default: the LM head, and Qwen-MoE's ``shared_expert_gate``
#: (a 1-output gate that vLLM and GPTQ checkpoints keep in float, like the routers; the
#: routers of transformers 5 are not linear layers and are never selected).
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*.shared_expert_gate")


def _config_n_layers(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = getattr(cfg, "get_text_config", None)
    cfg = text() if callable(text) else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def find_blocks(model):
    """``(name, ModuleList)`` of the model's decoder blocks, from the model's own structure.

    The decoder blocks are the :class:`torch.nn.ModuleList` whose every entry is an
    instance of a class named in the model's ``_no_split_modules`` (transformers lists its
    decoder-layer class there, e.g. ``LlamaDecoderLayer``, ``GPT2Block``). Several such
    lists (an encoder and a decoder) are told apart by the config's number of layers
    (``num_hidden_layers`` / ``n_layer``) and then by ``base_model_prefix``. A model that
    declares no ``_no_split_modules`` (a plain module) must have exactly one ModuleList
    whose length is the config's number of layers. Nothing else is guessed: when this
    does not single out one list, :class:`ValueError` says what was found.

    Parameters
    ----------
    model : torch.nn.Module
        Typically a transformers causal LM.

    Returns
    -------
    name : str
        The ModuleList's name in ``model.named_modules()``.
    blocks : torch.nn.ModuleList

    Raises
    ------
    ValueError
        If no ModuleList (or more than one) fits the rules above.

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
    ValueError: `model` has no torch.nn.ModuleList of decoder blocks (no `_no_split_modules` class list, no config with a number of layers)
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    n_layers = _config_n_layers(model)
    if block_classes:
        cands = [(n, m) for n, m in lists if all(type(b).__name__ in block_classes for b in m)]
        rule = f"entries of a `_no_split_modules` class {sorted(block_classes)}"
    elif n_layers is not None:
        cands = [(n, m) for n, m in lists if len(m) == n_layers]
        rule = f"length = the config's number of layers ({n_layers})"
    else:
        raise ValueError("`model` has no torch.nn.ModuleList of decoder blocks (no `_no_split_modules` class "
                         "list, no config with a number of layers)")
    if len(cands) > 1 and n_layers is not None:
        cands = [(n, m) for n, m in cands if len(m) == n_layers] or cands
    if len(cands) > 1:
        prefix = getattr(model, "base_model_prefix", "") or ""
        cands = [(n, m) for n, m in cands if n.startswith(prefix + ".")] or cands
    if len(cands) != 1:
        found = [f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in lists]
        raise ValueError(f"`model`: {len(cands)} ModuleLists have {rule}, need exactly one; "
                         f"ModuleLists found: {found}")
    return cands[0]


def is_linear(mod) -> bool:
    """``nn.Linear`` or transformers ``Conv1D``."""
    return isinstance(mod, torch.nn.Linear) or is_conv1d(mod)


def linear_weight(mod) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear-equivalent layer (a transposed view for Conv1D)."""
    return mod.weight.t() if is_conv1d(mod) else mod.weight


def linear_in_features(mod) -> int:
    """Input features of a linear-equivalent layer."""
    return int(mod.weight.shape[0] if is_conv1d(mod) else mod.weight.shape[1])


def set_linear_weight(mod, W: torch.Tensor) -> None:
    """Write the ``(out, in)`` weight `W` into a Linear or Conv1D in place."""
    with torch.no_grad():
        linear_weight(mod).copy_(W.to(mod.weight.dtype))


def _is_router(mod) -> bool:
    """A MoE router of transformers 5 (``*TopKRouter``: a 2-D ``weight`` (E, H) and ``top_k``);
    it stays in float by design."""
    return hasattr(mod, "top_k") and getattr(getattr(mod, "weight", None), "ndim", 0) == 2 \
        and not is_linear(mod)


def select_linears(model, targets=("*",), exclude=DEFAULT_EXCLUDE, *, warn=True):
    """Quantizable layers inside the decoder blocks whose name matches ``targets``.

    Returns ``{block index: {full name: layer}}`` (in registration order). A layer is an
    ``nn.Linear``, a transformers ``Conv1D`` (see :func:`is_conv1d`), or one weight of a
    fused mixture-of-experts module (:class:`~llm_adapter.calibration.experts.ExpertsPart`,
    named ``<experts module>.<parameter>``, e.g. ``model.layers.0.mlp.experts.gate_up_proj``;
    it stands for one quantized layer per expert). A pattern matches either the full name
    (``model.layers.3.self_attn.q_proj``) or the name inside the block
    (``self_attn.q_proj``); ``exclude`` patterns are removed afterwards.

    A module with a floating weight of 2 or more dimensions inside a block that is none of
    these (and not excluded) is named in a warning: it stays in float. MoE routers
    (``*TopKRouter`` modules: a 2-D ``weight`` and ``top_k``) stay in float by design
    (logged at INFO level).

    Parameters
    ----------
    model : torch.nn.Module
        Its blocks are found with :func:`find_blocks`.
    targets : str or sequence of str, default ("*",)
        :func:`fnmatch.fnmatchcase` patterns of the layers to keep.
    exclude : str or sequence of str, default :data:`DEFAULT_EXCLUDE`
        Patterns of layers to drop from the selection (the head, and the scalar gate of
        Qwen-MoE's shared expert, which serving stacks keep in float).
    warn : bool
        Log a warning naming the weights inside the blocks that cannot be quantized.

    Returns
    -------
    dict of int to dict of str to module or ExpertsPart
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
    from .experts import experts_parts

    if isinstance(targets, str):
        targets = (targets,)
    if isinstance(exclude, str):
        exclude = (exclude,)

    def matches(full, rel, patterns):
        return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in patterns)

    blocks_name, blocks = find_blocks(model)
    out = {}
    unhandled, routers = [], []
    for i, block in enumerate(blocks):
        sel = {}
        prefix = f"{blocks_name}.{i}." if blocks_name else f"{i}."
        for rel, mod in block.named_modules():
            if not rel:
                continue
            full = prefix + rel
            if is_linear(mod):
                if matches(full, rel, targets) and not matches(full, rel, exclude):
                    sel[full] = mod
                continue
            parts, skipped = experts_parts(mod, full)
            for part in parts:
                prel = part.name[len(prefix):]
                if matches(part.name, prel, targets) and not matches(part.name, prel, exclude):
                    sel[part.name] = part
            handled = {p.param for p in parts}
            if _is_router(mod):
                routers.append(full)
                continue
            for pname, p in mod.named_parameters(recurse=False):
                if pname in handled or p.ndim < 2 or not p.is_floating_point():
                    continue
                pfull, prel = f"{full}.{pname}", f"{rel}.{pname}"
                if matches(pfull, prel, targets) and not matches(pfull, prel, exclude) \
                        and not matches(full, rel, exclude):
                    why = skipped.get(pname, f"a {type(mod).__name__} weight of shape {tuple(p.shape)}")
                    unhandled.append(f"{pfull} ({why})")
        if sel:
            out[i] = sel
    if routers:
        logger.info("%d MoE router(s) stay in float: %s", len(routers), routers[:4] + (["..."] if len(routers) > 4 else []))
    if unhandled and warn:
        logger.warning("%d weight(s) in the blocks cannot be quantized by this selection and stay in float: %s",
                       len(unhandled), "; ".join(unhandled[:8]) + (" ..." if len(unhandled) > 8 else ""))
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


def hook_module(layer):
    """The module whose forward pre-hook sees `layer`'s input: the layer itself, or the
    experts module of an :class:`~llm_adapter.calibration.experts.ExpertsPart`."""
    return getattr(layer, "module", None) if hasattr(layer, "experts_name") else layer


def layer_groups(block, layers, probe):
    """Split ``layers`` (``{name: module or ExpertsPart}``) into groups, in execution order,
    from the block's data flow on one forward pass (`probe` = ``(hidden, rest, kwargs)``).

    Layers called on the same input tensor (the same object: q/k/v after one norm, gate and
    up, Falcon's parallel attention and MLP) form one group. A fused ``gate_up_proj``
    joins the group of the tensor its experts module is called on; the ``down_proj`` of
    the same experts module, whose input is computed inside that module, is a group of its
    own right after it. A layer called twice keeps its first call.

    Returns
    -------
    list of list of str

    Raises
    ------
    RuntimeError
        Naming the layers the block never called.
    """
    by_module = {}
    for name, layer in layers.items():
        key = getattr(layer, "experts_name", name)
        by_module.setdefault(key, (hook_module(layer), []))[1].append(name)
    seen = []
    with forward_pre_hooks({k: m for k, (m, _) in by_module.items()},
                           lambda key, m, args: seen.append((key, args[0]))):
        run_block(block, *probe)
    groups = []  # [names, input tensor or None]
    done = set()
    for key, x in seen:
        if key in done:
            continue  # a module called twice: keep its first call
        done.add(key)
        names = by_module[key][1]
        inner = [n for n in names if n.endswith(".down_proj") and hasattr(layers[n], "experts_name")]
        outer = [n for n in names if n not in inner]
        if outer:
            for g in groups:
                if g[1] is x:
                    g[0].extend(outer)
                    break
            else:
                groups.append([list(outer), x])
        if inner:
            groups.append([inner, None])
    missing = [n for n in layers if not any(n in g for g, _ in groups)]
    if missing:
        raise RuntimeError(f"layers never called by their block: {missing}")
    return [g for g, _ in groups]

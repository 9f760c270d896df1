r"""Block-by-block calibration and quantization of a transformers causal LM.

:func:`quantize_model` runs the model's decoder blocks one at a time on calibration
windows. For each selected linear layer it accumulates

.. math::

    H = \tilde X \tilde X^\top, \qquad D = (X - \tilde X)\,\tilde X^\top

(both divided by the number of tokens), where :math:`\tilde X` are the layer's inputs
when every earlier layer is already quantized and :math:`X` those of the float model;
``D`` is only computed for methods that use it (:attr:`QuantSpec.joint`). Each layer is
then handed to the pure :func:`llm_adapter.quantize.quantize_weight`, and its
dequantized weights are written back into the model in place.

Lifecycle, kept apart from the maths:

* The inputs of the first block, and the exact keyword arguments the model passes to its
  blocks (attention mask, rotary position embeddings, cache flags), are captured by
  swapping the first block for a :class:`_Catcher` that raises a private exception.
* The block list is found generically: the longest :class:`torch.nn.ModuleList`.
* Layers are chosen by :func:`fnmatch` patterns on their names (full or block-relative).
* Hooks are registered through :func:`forward_pre_hooks` only, which removes them in
  ``finally``.
* True-sequential (default, as GPTQ's reference): the selected layers of a block are
  split into groups that read the same input tensor, in execution order (Llama:
  q/k/v, o, gate/up, down); a group's statistics are collected with the earlier groups
  already quantized. A capture pass stops the block as soon as the group's input is
  seen (nothing after it is needed).
* Memory: the two streams of block inputs (quantized and, for joint methods, float),
  plus for joint methods the float inputs of the current block's layer groups.
* Resume: with ``checkpoint_dir`` every finished layer is written atomically; a
  restarted run loads finished layers instead of solving them and ends bit-identical
  (sampling is seeded from ``(seed, layer name)``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from bils.targets import fold_beta

from .lattice_method import (GLVQSpec, LatticeLayer, load_lattice_layer, quantize_weight_glvq,
                             save_lattice_layer)
from .quantize import quantize_weight
from .quantized import QuantizedLayer
from .spec import QuantSpec

__all__ = ["find_blocks", "select_linears", "forward_pre_hooks", "quantize_model",
           "save_layer", "load_layer"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model structure


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
    ValueError: no module matched `targets` ('attn.q_proj',) (blocks: 'model.layers')
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
        raise ValueError(f"no module matched `targets` {tuple(targets)} (blocks: {blocks_name!r})")
    return out


@contextlib.contextmanager
def forward_pre_hooks(modules, hook):
    """Register ``hook(name, module, args)`` as a forward pre-hook on every module of
    ``modules`` (a ``{name: module}`` dict); always removed on exit.

    A context manager: the hooks are active inside the ``with`` block only, and removed
    even when the block raises (e.g. an exception used to stop a forward pass early).

    Parameters
    ----------
    modules : dict of str to torch.nn.Module
        The modules to hook, by name (the name is passed to `hook`).
    hook : callable
        ``hook(name, module, args)``, called before each forward of a hooked module with
        its positional inputs ``args``; its return value is ignored.

    Yields
    ------
    None

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> seen = []
    >>> with forward_pre_hooks({"first": net[0], "last": net[2]},
    ...                        lambda name, m, args: seen.append((name, tuple(args[0].shape)))):
    ...     _ = net(torch.zeros(5, 4))
    >>> seen
    [('first', (5, 4)), ('last', (5, 3))]
    >>> _ = net(torch.zeros(5, 4))  # the hooks are gone
    >>> len(seen)
    2
    """
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, _name=name: hook(_name, m, args)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Private: carries what a hook captured out of a forward pass."""

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
        raise _Stop(args, kwargs)


def _first_block_inputs(model, blocks, windows, batch_size, device):
    """Per batch: (hidden states, other positional args, kwargs) reaching block 0."""
    inps = []
    first = blocks[0]
    blocks[0] = _Catcher(first)
    try:
        for b0 in range(0, windows.shape[0], batch_size):
            batch = windows[b0:b0 + batch_size].to(device=device, dtype=torch.long)
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop as caught:
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


def _run_block(block, hidden, rest, kwargs):
    out = block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_groups(block, layers, probe):
    """Split ``layers`` into groups reading the same input tensor, in execution order."""
    seen = []
    with forward_pre_hooks(layers, lambda name, m, args: seen.append((name, args[0]))):
        _run_block(block, *probe)
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


# --------------------------------------------------------------------------- checkpoints


def _ckpt_path(directory, name):
    return Path(directory) / f"{name}.npz"


def save_layer(path, q: QuantizedLayer):
    """Write ``q`` to ``path`` (.npz) atomically (temporary file + :func:`os.replace`).

    Parameters
    ----------
    path : str or path-like
        The file to write (its directory must exist); an existing file is replaced.
    q : QuantizedLayer
        Codes, grid, ``perm``, ``bias`` and ``stats`` (JSON-serialisable) are stored.

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.quantize import quantize_weight
    >>> from llm_adapter.spec import QuantSpec
    >>> W = np.random.default_rng(0).standard_normal((8, 16))
    >>> q = quantize_weight(W, spec=QuantSpec(bits=4, method="rtn"))
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = pathlib.Path(tmp.name) / "fc.npz"
    >>> save_layer(path, q)
    >>> r = load_layer(path)
    >>> r.shape, r.bits, r.group_size, bool(np.array_equal(r.codes, q.codes))
    ((8, 16), 4, -1, True)
    >>> r.stats["method"]
    'rtn'
    >>> tmp.cleanup()
    """
    path = Path(path)
    meta = {"bits": q.bits, "group_size": q.group_size, "stats": q.stats}
    arrays = {"codes": q.codes, "scales": q.scales, "zeros": q.zeros, "g_idx": q.g_idx,
              "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    if q.perm is not None:
        arrays["perm"] = q.perm
    if q.bias is not None:
        arrays["bias"] = q.bias
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_layer(path) -> QuantizedLayer:
    """Read a layer written by :func:`save_layer`.

    Parameters
    ----------
    path : str or path-like
        An ``.npz`` file written by :func:`save_layer`.

    Returns
    -------
    QuantizedLayer

    Examples
    --------
    >>> import numpy as np
    >>> from llm_adapter.quantize import quantize_weight
    >>> from llm_adapter.spec import QuantSpec
    >>> W = np.random.default_rng(0).standard_normal((8, 16))
    >>> q = quantize_weight(W, spec=QuantSpec(bits=4, method="rtn"))
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = pathlib.Path(tmp.name) / "fc.npz"
    >>> save_layer(path, q)
    >>> r = load_layer(path)
    >>> r.shape, r.bits, r.group_size, bool(np.array_equal(r.codes, q.codes))
    ((8, 16), 4, -1, True)
    >>> r.stats["method"]
    'rtn'
    >>> tmp.cleanup()
    """
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        return QuantizedLayer(codes=z["codes"], scales=z["scales"], zeros=z["zeros"], g_idx=z["g_idx"],
                              bits=meta["bits"], group_size=meta["group_size"],
                              perm=z["perm"] if "perm" in z.files else None,
                              bias=z["bias"] if "bias" in z.files else None, stats=meta["stats"])


def _check_manifest(directory, manifest):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            raise ValueError(f"`checkpoint_dir` {str(directory)!r} holds a run with different settings: "
                             f"{old} != {manifest}; use another directory or delete it")
        return
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _layer_rng(seed, name):
    """Generator seeded from (seed, layer name): independent of how many layers ran before."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


# --------------------------------------------------------------------------- driver


def quantize_model(model, windows, spec: QuantSpec | GLVQSpec, *, targets=("*",), exclude=("lm_head", "*.lm_head"),
                   true_sequential=True, batch_size=8, seed=0, checkpoint_dir=None, backend="auto",
                   callback=None, rtn_calibrate=False, progress=True):
    r"""Quantize the linear layers of a causal LM block by block, in place.

    Parameters
    ----------
    model : transformers causal LM
        Modified in place: every selected layer's weight becomes its dequantized value.
    windows : (n_windows, T) integer torch.Tensor
        Calibration token windows (:func:`llm_adapter.data.calibration_windows`).
    spec : QuantSpec
    targets, exclude : str or sequence of str
        :func:`fnmatch` patterns selecting linear layers inside the blocks (see
        :func:`select_linears`).
    true_sequential : bool
        Quantize groups of layers sharing an input in execution order, re-running the
        block between groups (GPTQ's ``--true-sequential``). ``False``: one capture pass
        per block for all its layers.
    batch_size : int
        Windows per forward pass (statistics are sums, so the result does not depend
        on it beyond floating-point rounding).
    seed : int
        Seeds α sampling and Klein paths per layer, from ``(seed, layer name)``.
    checkpoint_dir : path-like, optional
        Per-layer checkpoints (``<name>.npz`` + ``manifest.json``). Layers found there
        are loaded instead of solved, so a killed run restarted with the same
        arguments finishes with identical codes.
    backend : str
        Passed to :func:`~llm_adapter.quantize.quantize_weight`.
    callback : callable, optional
        ``callback(name, qlayer)`` after each layer is done (solved or loaded); an
        exception raised there aborts the run (after its checkpoint was written).
    rtn_calibrate : bool
        ``method="rtn"`` needs no activations; by default no forward pass is run and
        no loss is reported. ``True`` collects ``H`` anyway for the loss.
    progress : bool
        tqdm bar over blocks.

    Returns
    -------
    dict
        ``{layer name: QuantizedLayer}`` in quantization order.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(  # a tiny random Llama: nothing is downloaded
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> from llm_adapter.spec import QuantSpec
    >>> windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    >>> layers = quantize_model(model, windows, QuantSpec(bits=4, method="gptq"),
    ...                         targets="self_attn.*", backend="numpy", progress=False)
    >>> list(layers)[:4]  # doctest: +NORMALIZE_WHITESPACE
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj',
     'model.layers.0.self_attn.v_proj', 'model.layers.0.self_attn.o_proj']
    >>> q = layers["model.layers.1.self_attn.k_proj"]
    >>> q.shape, q.bits, q.stats["method"], q.stats["rel_loss"] < 0.05
    ((16, 32), 4, 'gptq', True)
    >>> w = model.model.layers[1].self_attn.k_proj.weight  # dequantized in place
    >>> bool(torch.equal(w, torch.from_numpy(q.dequantize())))
    True
    """
    if not isinstance(spec, (QuantSpec, GLVQSpec)):
        raise TypeError(f"`spec` must be a QuantSpec or GLVQSpec, got {type(spec).__name__}")
    lattice = spec.method == "glvq"
    quantize = quantize_weight_glvq if lattice else quantize_weight
    save = save_lattice_layer if lattice else save_layer
    load = load_lattice_layer if lattice else load_layer
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2:
        raise ValueError("`windows` must be a 2-D integer torch.Tensor (n_windows, T)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    from tqdm.auto import tqdm

    selected = select_linears(model, targets, exclude)
    _, blocks = find_blocks(model)
    device = next(blocks[0].parameters()).device
    if checkpoint_dir is not None:
        _check_manifest(checkpoint_dir, {
            "spec": spec.to_dict(), "true_sequential": bool(true_sequential), "seed": int(seed),
            "windows": list(windows.shape), "windows_crc": zlib.crc32(windows.cpu().numpy().tobytes()),
            "layers": sorted(n for sel in selected.values() for n in sel)})
    results = {}

    def finish(name, mod, H, D):
        path = None if checkpoint_dir is None else _ckpt_path(checkpoint_dir, name)
        if path is not None and path.exists():
            q = load(path)
            logger.info("%s: loaded from %s", name, path)
        else:
            W = mod.weight.detach()
            bias = None if mod.bias is None else mod.bias.detach()
            q = quantize(W, H, D, spec, backend=backend, rng=_layer_rng(seed, name), bias=bias)
            if path is not None:
                save(path, q)
            st = q.stats
            logger.info("%s: rel_loss %s  clipped %.4f  alpha %s  %.2f s", name,
                        "-" if st.get("rel_loss") is None else f"{st['rel_loss']:.4g}",
                        st.get("clipped_frac", float("nan")), st.get("alpha"), st["time"])
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(q.dequantize()).to(mod.weight.dtype))
        results[name] = q
        if callback is not None:
            callback(name, q)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if spec.method == "rtn" and not rtn_calibrate:
                for sel in selected.values():
                    for name, mod in sel.items():
                        finish(name, mod, None, None)
                return results
            _calibrate(model, blocks, selected, windows, spec, true_sequential, batch_size, seed,
                       checkpoint_dir, device, finish, progress, tqdm)
    finally:
        model.train(was_training)
    return results


def _calibrate(model, blocks, selected, windows, spec, true_sequential, batch_size, seed,
               checkpoint_dir, device, finish, progress, tqdm):
    joint = spec.joint
    inps = _first_block_inputs(model, blocks, windows, batch_size, device)
    qstream = [h for h, _, _ in inps]  # X̃: block inputs from the quantized model, per batch
    fstream = [h.clone() for h in qstream] if joint else None  # X: float block inputs
    extras = [(r, k) for _, r, k in inps]
    n_tok = sum(h.shape[0] * h.shape[1] for h in qstream)
    alpha_m = spec.beta_m if spec.method == "regcal" and spec.alpha == "sample" else None
    n_seq = windows.shape[0]

    def done(name):
        return checkpoint_dir is not None and _ckpt_path(checkpoint_dir, name).exists()

    for bi in tqdm(range(len(blocks)), desc="quantize", unit="block", disable=not progress):
        block = blocks[bi]
        layers = selected.get(bi, {})
        t0 = time.perf_counter()
        # groups of layers reading the same input tensor, in execution order; a stage is
        # what is solved between two capture passes
        groups = _layer_groups(block, layers, (qstream[0], *extras[0])) if layers else []
        stages = [[g] for g in groups] if true_sequential else ([groups] if groups else [])
        todo = [g[0] for g in groups if not all(done(n) for n in g)]

        # Float pass (joint methods), before anything in this block is quantized, so the
        # block itself is the float block: keep the float inputs of the groups to solve.
        finputs = {lead: [] for lead in todo} if joint else None
        if joint:
            def keep(name, m, args):
                finputs[name].append(args[0].reshape(-1, args[0].shape[-1]).clone())

            with forward_pre_hooks({n: layers[n] for n in todo}, keep):
                fstream = [_run_block(block, h, *e) for h, e in zip(fstream, extras)]

        for stage in stages:
            leads = [g[0] for g in stage if g[0] in todo]
            stats = {}
            if leads:
                stats = _capture(block, layers, leads, qstream, extras, finputs, alpha_m, n_seq, seed,
                                 stop_early=true_sequential)
            for g in stage:
                if g[0] in stats:
                    H, D = stats.pop(g[0])
                    Hn = (H / n_tok).numpy()
                    Dn = None if D is None else (D / n_tok).numpy()
                else:
                    Hn = Dn = None  # every layer of the group is in the checkpoint
                for name in g:
                    finish(name, layers[name], Hn, Dn)
        # the next quantized stream goes through the (now quantized) block
        qstream = [_run_block(block, h, *e) for h, e in zip(qstream, extras)]
        finputs = None
        logger.info("block %d done in %.1f s", bi, time.perf_counter() - t0)


def _capture(block, layers, leads, qstream, extras, finputs, alpha_m, n_seq, seed, *, stop_early):
    r"""Run the block on the quantized stream and return ``{lead: (H, D)}`` (sums).

    With ``stop_early`` (one lead) the pass stops at the lead's input: nothing after it
    is needed. Per-sequence α (``alpha_m`` = Beta parameter) is drawn from
    ``(seed, lead)`` and folded into ``D``.
    """
    acc = {}
    for lead in leads:
        n_in = layers[lead].in_features
        alphas = None if alpha_m is None else torch.from_numpy(
            fold_beta(_layer_rng(seed, lead), alpha_m, size=n_seq)).float()
        acc[lead] = (torch.zeros(n_in, n_in, dtype=torch.float64),
                     None if finputs is None else torch.zeros(n_in, n_in, dtype=torch.float64), alphas)
    state = {"batch": 0, "seq": 0}

    def accumulate(name, m, args):
        H, D, alphas = acc[name]
        x = args[0]
        nb, width = x.shape[0], x.shape[-1]
        x = x.reshape(-1, width).float()
        H.add_((x.T @ x).double())  # float32 product per batch, float64 accumulation
        if D is not None:
            dx = finputs[name][state["batch"]].float() - x
            if alphas is not None:
                a = alphas[state["seq"]:state["seq"] + nb]
                dx = dx * a.repeat_interleave(x.shape[0] // nb)[:, None]
            D.add_((dx.T @ x).double())
        if stop_early:
            raise _Stop()

    with forward_pre_hooks({n: layers[n] for n in leads}, accumulate):
        for b, (h, e) in enumerate(zip(qstream, extras)):
            state["batch"] = b
            try:
                _run_block(block, h, *e)
            except _Stop:
                pass
            state["seq"] += h.shape[0]
    return {k: (v[0], v[1]) for k, v in acc.items()}

r"""Block-by-block calibration and quantization of a transformers causal LM.

:func:`quantize_model` runs the model's decoder blocks one at a time on calibration
windows. For each selected linear layer it accumulates

.. math::

    H = \tilde X \tilde X^\top, \qquad D = (X - \tilde X)\,\tilde X^\top

(both divided by the number of tokens), where :math:`\tilde X` are the layer's inputs
when every earlier layer is already quantized and :math:`X` those of the float model;
``D`` is only computed for methods that use it (``spec.joint``). Each layer is
then handed to its method's pure ``quantize`` (:mod:`llm_adapter.methods`) through a
:class:`LayerSolver` (the seam for running solves elsewhere), and its
dequantized weights are written back into the model in place.

Lifecycle, kept apart from the maths:

* The inputs of the first block, and the exact keyword arguments the model passes to its
  blocks (attention mask, rotary position embeddings, cache flags), are captured by
  swapping the first block for a stand-in that raises (:mod:`~llm_adapter.calibration.blocks`).
* The block list is found from the model's own structure (``_no_split_modules``, the
  config's number of layers, ``base_model_prefix``; :func:`~llm_adapter.calibration.blocks.find_blocks`).
* Layers (``nn.Linear``, transformers ``Conv1D`` with its transposed weight, and the fused
  3-D weights of MoE experts, quantized expert by expert with the statistics of the tokens
  routed to each: :mod:`~llm_adapter.calibration.experts`) are chosen by :func:`fnmatch`
  patterns on their names (full or block-relative); weights that cannot be quantized are
  named in a warning.
* Hooks are registered through :func:`~llm_adapter.calibration.hooks.forward_pre_hooks`
  only, which removes them in ``finally``; the sums are :class:`~llm_adapter.calibration.statistics.LayerStatistics`.
* True-sequential (default, as GPTQ's reference): the selected layers of a block are
  split into groups that read the same input tensor, found from the block's data flow
  on one forward pass (Llama: q/k/v, o, gate/up, down; Falcon: query_key_value with
  dense_h_to_4h); a group's statistics are collected with the earlier groups
  already quantized. Single pass (default, ``single_pass=True``): the batches of the
  quantized stream go through the block together, one thread each, and stop at each
  group's input, where the group is solved and written before they go on: a block costs
  one forward pass over the quantized stream (plus, for joint methods, one over the
  float stream), the least a sequential calibration can do. ``single_pass=False``: a
  capture pass per group that stops the block as soon as the group's input is seen,
  then a pass through the quantized block (the same codes, about three block forwards).
* Memory: the two streams of block inputs (quantized and, for joint methods, float),
  plus for joint methods the float inputs of the current block's layer groups; the
  single pass also holds the block's live activations of every batch at a group's
  input (see ``single_pass``).
* Profile: every run's seconds per stage (forward passes by kind, statistics, solves,
  grid search, write-back, checkpoint I/O), per block and in total, go to
  ``report["profile"]`` (:mod:`~llm_adapter.calibration.profile`).
* Resume: with ``checkpoint_dir`` every finished layer is written atomically; a
  restarted run loads finished layers instead of solving them and ends bit-identical
  (sampling is seeded from ``(seed, layer name)``).
* Device (``device=``): the model stays where it was loaded; the calibration streams live
  on ``device``, each block is moved there (:meth:`torch.nn.Module.to`), run, its
  statistics summed there in float32 (float64 only for what is handed to the solve), its
  layers solved on device arrays (CuPy through DLPack for CUDA, numpy views for the CPU;
  the :mod:`bils` backend ``"auto"`` then picks ``"cupy"``), its quantized weights written
  back, and it goes back before the next block comes: at most one block is on ``device``
  at a time.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bils.targets import fold_beta

from .. import methods
from ..errors import ParameterError
from .blocks import (DEFAULT_EXCLUDE, StopForward, find_blocks, first_block_inputs, hook_module, layer_groups,
                     linear_in_features, linear_weight, run_block, select_linears, set_linear_weight)
from .experts import MIN_EXPERT_TOKENS, ExpertsPart, ExpertsStatistics
from .checkpoints import check_manifest, layer_path, load_layer, save_layer
from .hooks import forward_pre_hooks
from .memory import trim as trim_memory
from .profile import StageProfile, format_profile
from .statistics import LayerStatistics

__all__ = ["ExecutorSolver", "InlineSolver", "LayerSolver", "quantize_model", "solve_layer"]

logger = logging.getLogger("llm_adapter.calibration")


# --------------------------------------------------------------------------- the seam
def solve_layer(W, H, D, spec, *, backend="auto", rng=None, bias=None):
    """Quantize one layer with its spec's registered method (what a solver runs)."""
    return methods.for_spec(spec).quantize(W, H, D, spec, backend=backend, rng=rng, bias=bias)


@dataclass
class _Done:
    """A finished future."""

    value: Any

    def result(self, timeout=None):
        return self.value


class LayerSolver:
    """Where the driver's layer solves run: ``submit(...)`` returns an object with ``result()``.

    The driver calls ``submit(name, W, H, D, spec, backend=..., rng=..., bias=...)`` for
    every layer of a stage (numpy arrays in: ``W`` (out, in) float32, ``H`` / ``D`` (in, in)
    float64 or None), then ``result()`` on each in submission order.

    A solver whose ``device_arrays`` is True also accepts, from a run with ``device=``,
    arrays living on that device (CuPy arrays for CUDA, numpy for the CPU), and gets them
    when the method accepts them too (:attr:`llm_adapter.methods.Method.device_arrays`);
    otherwise the driver copies them to the host first.
    """

    #: Whether ``submit`` accepts device (CuPy) arrays.
    device_arrays = False

    def submit(self, name, W, H, D, spec, *, backend="auto", rng=None, bias=None):
        raise NotImplementedError


class InlineSolver(LayerSolver):
    """Solve at submission, in this process (the default); takes device arrays."""

    device_arrays = True

    def submit(self, name, W, H, D, spec, *, backend="auto", rng=None, bias=None):
        return _Done(solve_layer(W, H, D, spec, backend=backend, rng=rng, bias=bias))


class ExecutorSolver(LayerSolver):
    """Hand solves to `executor`: anything with ``submit(fn, *args, **kwargs) -> future``
    (:class:`concurrent.futures.ProcessPoolExecutor`, ``distributed.Client``).

    The method must be registered in the worker processes too (built-ins always are).
    """

    def __init__(self, executor):
        self.executor = executor

    def submit(self, name, W, H, D, spec, *, backend="auto", rng=None, bias=None):
        return self.executor.submit(solve_layer, W, H, D, spec, backend=backend, rng=rng, bias=bias)


def layer_rng(seed, name):
    """Generator seeded from (seed, layer name): independent of how many layers ran before."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


# --------------------------------------------------------------------------- driver
def quantize_model(model, windows, spec, *, targets=("*",), exclude=DEFAULT_EXCLUDE,
                   true_sequential=True, batch_size=8, seed=0, checkpoint_dir=None, backend="auto",
                   callback=None, rtn_calibrate=False, progress=True, solver=None, device=None,
                   report=None, client=None, min_expert_tokens=MIN_EXPERT_TOKENS, single_pass=True,
                   layer_specs=None):
    r"""Quantize the linear layers of a causal LM block by block, in place.

    Parameters
    ----------
    model : transformers causal LM
        Modified in place: every selected layer's weight becomes its dequantized value.
    windows : (n_windows, T) integer torch.Tensor
        Calibration token windows (:func:`llm_adapter.data.calibration_windows`).
    spec : QuantSpec, GLVQSpec, ...
        The spec of a registered method (:mod:`llm_adapter.methods`); ``spec.method`` picks it.
        A :class:`QuantSpec` with ``tune_steps > 0`` tunes the group scales of all layers
        after the last block (:func:`llm_adapter.calibration.tuning.tune_scales`, on these
        `windows`, seeded by `seed`); the returned layers and the model carry the tuned scales.
    targets, exclude : str or sequence of str
        :func:`fnmatch` patterns selecting linear layers (``nn.Linear``, ``Conv1D``) and
        fused expert weights inside the blocks (see :func:`select_linears`). A fused
        expert weight ``<experts>.gate_up_proj`` gives one layer per expert,
        ``<experts>.gate_up_proj.<e>``.
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
        Passed to the method's ``quantize``.
    callback : callable, optional
        ``callback(name, qlayer)`` after each layer is done (solved or loaded); an
        exception raised there aborts the run (after its checkpoint was written).
    rtn_calibrate : bool
        Methods that need no activations (rtn): by default no forward pass is run and
        no loss is reported. ``True`` collects ``H`` anyway for the loss.
    progress : bool
        tqdm bar over blocks.
    solver : LayerSolver, optional
        Where layer solves run: :class:`InlineSolver` (default, in this process, at
        submission) or :class:`ExecutorSolver` around a ``concurrent.futures`` executor or a
        ``distributed.Client``. All layers of a stage are submitted before the first
        result is awaited; results are applied in submission order, so the codes do not
        depend on the solver.
    device : None, "cpu", "cuda", "cuda:N" or torch.device
        ``None`` (default): everything runs where the model is. Otherwise the model stays
        where it was loaded and is onloaded block by block: the calibration streams live
        on `device`, each block is moved there, its statistics are summed there in
        float32 and its layers are solved on device arrays (with ``backend="auto"``, the
        :mod:`bils` CUDA backend for a CUDA device), then the block goes back. At most one
        block is on `device` at a time; peak device memory is about one block plus the
        calibration streams (and, for joint methods, the float inputs of the block's
        layer groups). Codes agree with ``device=None`` up to the rounding of the float32
        sums.
    report : dict, optional
        Filled with figures of the run: ``"block_seconds"`` (list, per block),
        ``"device"``, ``"profile"`` (the stage profile,
        :meth:`~llm_adapter.calibration.profile.StageProfile.as_dict`: ``"totals"``
        ``{stage: seconds}`` with ``"wall"`` the whole call, and ``"blocks"``, one dict per
        block; stages in :mod:`llm_adapter.calibration.profile`) and, on CUDA,
        ``"peak_device_bytes"`` (:func:`torch.cuda.max_memory_allocated` over the run); with
        scale tuning ``"tune"`` (held-out KL before/after, steps, seconds, history).
    client : distributed.Client, optional
        Solve the layers on this dask cluster: shorthand for
        ``solver=llm_adapter.distributed.ClusterSolver(client)`` (each layer of a
        row-separable method split by output rows, other methods one task per layer).
        The forward passes and statistics stay here; the codes are the local run's, bit
        for bit. A cluster that goes away raises
        :class:`llm_adapter.distributed.ClusterLostError` naming the layer; with
        ``checkpoint_dir`` every layer finished before it is kept, and a rerun (with or
        without a cluster) resumes from there. Not together with `solver`.
    min_expert_tokens : int
        Fused MoE experts routed fewer calibration tokens than this are quantized with the
        shared pre-routing statistics (:mod:`llm_adapter.calibration.experts`); each
        expert layer's ``stats["tokens"]`` and ``stats["fallback"]`` record it.
    single_pass : bool
        True-sequential blocks in one pass over the quantized stream (default): every
        batch runs in a thread of its own, the threads stop together at each group's
        input, where the group is solved and written before they go on (one thread
        computes at a time). Same codes as ``False``, the capture passes (one per group,
        stopped at its input, then a pass through the quantized block): a block costs one
        forward instead of about three. Memory: the block's live activations of every
        calibration token at a group's input (for a Llama block the residual, the
        hidden states and at the ``down_proj`` the MLP's intermediate activation) instead
        of one batch's. Blocks whose groups mix fused MoE experts with other layers take
        the capture passes.
    layer_specs : dict of str to spec, optional
        Per-layer specs (mixed precision, e.g. from
        :func:`llm_adapter.calibration.allocation.allocate_bits`): a layer named there is
        solved with its own spec, every other layer with `spec`. Each must be of `spec`'s
        method; `spec` decides which statistics are collected (``D`` when ``spec.joint``).

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
    >>> from llm_adapter import QuantSpec
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
    t_run = time.perf_counter()
    method = methods.for_spec(spec)
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2:
        raise ParameterError("windows", "`windows` must be a 2-D integer torch.Tensor (n_windows, T)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError("batch_size", f"`batch_size` must be a positive int, got {batch_size!r}")
    if not isinstance(single_pass, bool):
        raise ParameterError("single_pass", f"`single_pass` must be a bool, got {single_pass!r}")
    from tqdm.auto import tqdm

    if client is not None:
        if solver is not None:
            raise ParameterError("client", "give `solver` or `client`, not both")
        from ..distributed import ClusterSolver

        solver = ClusterSolver(client)
    target = _device_iv(device)
    layer_specs = _layer_specs_iv(layer_specs, spec)
    solver = InlineSolver() if solver is None else solver
    selected = select_linears(model, targets, exclude)
    float_weights = _tune_iv(spec, selected)
    _, blocks = find_blocks(model)
    home = next(blocks[0].parameters()).device
    report = {} if report is None else report
    report.update(block_seconds=[], device=str(target or home))
    if target is not None and target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    ckpt_lock = None  # held for the whole run: a second run on the directory is refused
    if checkpoint_dir is not None:
        ckpt_lock = check_manifest(checkpoint_dir, {
            "spec": spec.to_dict(), "true_sequential": bool(true_sequential), "seed": int(seed),
            **({"layer_specs": {n: v.to_dict() for n, v in sorted(layer_specs.items())}} if layer_specs else {}),
            "windows": list(windows.shape), "windows_crc": zlib.crc32(windows.cpu().numpy().tobytes()),
            "layers": sorted(s.name for sel in selected.values() for layer in sel.values()
                             for s in _slots(layer, sel, None))}, model=model)
    run = _Run(spec, seed, checkpoint_dir, backend, solver, callback, target)
    run.layer_specs = layer_specs
    run.min_expert_tokens = int(min_expert_tokens)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _cupy_in_torch_memory(target if method.device_arrays else None):
            if not method.needs_calibration and not rtn_calibrate:
                run.finish_all([(slot, None, None, {}) for sel in selected.values() for name, layer in sel.items()
                                for slot in _slots(layer, sel, name)])
            else:
                bar = tqdm(range(len(blocks)), desc="quantize", unit="block", disable=not progress)
                _calibrate(model, blocks, selected, windows, run, bar=bar, true_sequential=true_sequential,
                           batch_size=batch_size, home=home, target=target, report=report,
                           single_pass=single_pass)
    finally:
        model.train(was_training)
        report["profile"] = run.profile.as_dict()
        report["profile"]["totals"]["wall"] = time.perf_counter() - t_run
        if target is not None and target.type == "cuda":
            report["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(target))
            logger.info("peak device memory on %s: %.2f GiB", target, report["peak_device_bytes"] / 2**30)
        if ckpt_lock is not None:
            ckpt_lock.release()
    if float_weights is None:
        return run.results
    return _tune(model, run.results, float_weights, windows, spec, seed=seed, progress=progress, report=report)


def _tune_iv(spec, selected):
    """The float weights of the selected layers when ``spec.tune_steps`` asks for scale tuning
    (checked before any work: tuning needs plain ``torch.nn.Linear`` layers), else None."""
    if not getattr(spec, "tune_steps", 0):
        return None
    weights = {}
    for sel in selected.values():
        for name, layer in sel.items():
            if not isinstance(layer, torch.nn.Linear):
                raise ParameterError("tune_steps", f"`tune_steps` > 0 needs torch.nn.Linear layers; {name!r} is a "
                                                   f"{type(layer).__name__}")
            weights[name] = layer.weight.detach().clone()
    return weights


def _tune(model, layers, float_weights, windows, spec, *, seed, progress, report):
    """Scale tuning after quantization (``spec.tune_steps > 0``): the float weights go back in
    as the teacher, :func:`~llm_adapter.calibration.tuning.tune_scales` leaves the tuned
    dequantized weights in the model; returns the tuned layers."""
    from .tuning import tune_scales

    with torch.no_grad():
        for name, W in float_weights.items():
            model.get_submodule(name).weight.copy_(W)
    res = tune_scales(model, layers, windows, steps=spec.tune_steps, lr=spec.tune_lr, norms=spec.tune_norms,
                      seed=seed, progress=progress)
    report["tune"] = {"holdout_kl": res.holdout_kl, "best_step": res.best_step, "steps": res.steps,
                      "seconds": res.seconds, "history": res.history}
    return res.layers


_DEVICE_RULE = "`device` must be None, 'cpu', 'cuda', 'cuda:N' or a torch.device of type cpu or cuda"


def _device_iv(device):
    """`device` as a :class:`torch.device` (None stays None); errors name the argument."""
    if device is None:
        return None
    if isinstance(device, str):
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
            raise ParameterError("device", f"{_DEVICE_RULE}, got {device!r}")
        device = torch.device(device)
    if not isinstance(device, torch.device) or device.type not in ("cpu", "cuda"):
        raise ParameterError("device", f"{_DEVICE_RULE}, got {device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", f"`device`={str(device)!r} but torch sees no CUDA device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ParameterError("device", f"`device`={str(device)!r} but torch sees "
                                           f"{torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


@contextlib.contextmanager
def _cupy_in_torch_memory(target):
    """On a CUDA `target`, CuPy allocations (the solves) are served by torch's caching
    allocator inside the block: one memory pool instead of two holding on to freed memory,
    and :func:`torch.cuda.max_memory_allocated` counts the solves too. Thread-local
    (``cupy.cuda.using_allocator``); nothing is changed outside the block."""
    if target is None or target.type != "cuda":
        yield
        return
    try:
        import cupy
    except ImportError:  # the solves then copy to the host (or fail with bils's message)
        yield
        return
    using = getattr(cupy.cuda, "using_allocator", None)
    if using is None:  # a CuPy without the thread-local switch: keep its own pool
        yield
        return

    def alloc(size):
        dev = cupy.cuda.Device().id
        t = torch.empty(max(int(size), 1), dtype=torch.uint8, device=torch.device("cuda", dev))
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(t.data_ptr(), size, t, dev), 0)

    with using(alloc):
        yield


def to_device(obj, device):
    """`obj` with every tensor inside (tuples, lists, dicts, nested) moved to `device`;
    other values are returned as they are.

    Examples
    --------
    >>> import torch
    >>> moved = to_device((torch.ones(2), [torch.zeros(1)], {"mask": None, "n": 3}), "cpu")
    >>> moved[0].device.type, moved[1][0].device.type, moved[2]
    ('cpu', 'cpu', {'mask': None, 'n': 3})
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def device_array(t: torch.Tensor):
    """The tensor `t` as an array of its device's namespace, without a copy: numpy for a
    CPU tensor, CuPy for a CUDA tensor (DLPack). A non-contiguous `t` is copied first.

    Examples
    --------
    >>> import torch
    >>> t = torch.arange(4.0)
    >>> a = device_array(t)
    >>> type(a).__name__, a.tolist()
    ('ndarray', [0.0, 1.0, 2.0, 3.0])
    >>> a[0] = 7.0; float(t[0])  # the same memory
    7.0
    """
    t = t.detach().contiguous()
    if t.device.type == "cuda":
        import cupy

        with cupy.cuda.Device(t.device.index):
            return cupy.from_dlpack(t)
    return t.numpy()


class _Slot:
    """One quantized layer: a Linear/Conv1D module, or one expert of a fused weight."""

    def __init__(self, name, module=None, part=None, expert=None):
        self.name, self.module, self.part, self.expert = name, module, part, expert

    def weight(self) -> torch.Tensor:
        return self.part.weight(self.expert) if self.part is not None else linear_weight(self.module)

    def bias(self):
        return None if self.part is not None else self.module.bias

    def write(self, W: torch.Tensor) -> None:
        if self.part is not None:
            self.part.set_weight(self.expert, W)
        else:
            set_linear_weight(self.module, W)


def _slots(layer, sel, name):
    """The quantized layers behind one selected entry (one per expert for an ExpertsPart)."""
    if isinstance(layer, ExpertsPart):
        return [_Slot(layer.layer_name(e), part=layer, expert=e) for e in range(layer.n_experts)]
    if name is None:
        name = next(n for n, m in sel.items() if m is layer)
    return [_Slot(name, module=layer)]


class _Run:
    """One run's layer bookkeeping: checkpoints, submission to the solver, write-back."""

    def __init__(self, spec, seed, checkpoint_dir, backend, solver, callback, target=None):
        self.spec, self.seed, self.checkpoint_dir = spec, seed, checkpoint_dir
        self.backend, self.solver, self.callback = backend, solver, callback
        self.target = target  # torch.device of the device path, or None
        self.results = {}
        self.profile = StageProfile()
        self.layer_specs = {}

    def spec_for(self, name):
        """The spec layer `name` is solved with (``layer_specs`` override, else the run's)."""
        return self.layer_specs.get(name, self.spec)

    def arrays(self, t):
        """A tensor as the solver takes it: a device array on the device path (when the
        solver accepts them), else a numpy array on the host."""
        if t is None:
            return None
        if self.target is not None and getattr(self.solver, "device_arrays", False) \
                and methods.for_spec(self.spec).device_arrays:
            return device_array(t)
        return t.detach().cpu().numpy()

    def done(self, name) -> bool:
        return self.checkpoint_dir is not None and layer_path(self.checkpoint_dir, name).exists()

    def finish_all(self, items):
        """Solve (or load) ``[(slot, H, D, extra stats), ...]``: submit every solve, then apply in order."""
        prof = self.profile
        pending = []
        t_solve = time.perf_counter()
        other = 0.0  # seconds of this call not spent solving (checkpoints, write-back, callback)
        for slot, H, D, extra in items:
            name = slot.name
            if self.done(name):
                path = layer_path(self.checkpoint_dir, name)
                shape = tuple(slot.weight().shape)
                t1 = time.perf_counter()
                pending.append((slot, _Done(load_layer(path, spec=self.spec_for(name), shape=shape)), path, extra))
                dt = time.perf_counter() - t1
                prof.add("checkpoint_io", dt)
                other += dt
                logger.info("%s: loaded from %s", name, path)
                continue
            if self.target is not None:  # the device path: H, D are float64 tensors on the device
                W = self.arrays(slot.weight().detach().float())
                H, D = self.arrays(H), self.arrays(D)
            else:
                W = slot.weight().detach().float().cpu().numpy()
            b = slot.bias()
            bias = None if b is None else b.detach().cpu().numpy()
            fut = self.solver.submit(name, W, H, D, self.spec_for(name), backend=self.backend,
                                     rng=layer_rng(self.seed, name), bias=bias)
            pending.append((slot, fut, None, extra))
        for i, (slot, fut, loaded_from, extra) in enumerate(pending):
            name = slot.name
            try:
                q = fut.result()
            except BaseException:
                _cancel(f for _, f, _, _ in pending[i + 1:])  # the stage's solves still queued
                raise
            t1 = time.perf_counter()
            if loaded_from is None:
                if extra:
                    q.stats.update(extra)
                tg = q.stats.get("time_grid")
                if isinstance(tg, float):
                    prof.add("grid_search", tg)
                    other += tg
                if self.checkpoint_dir is not None:
                    with prof.timed("checkpoint_io"):
                        save_layer(layer_path(self.checkpoint_dir, name), q)
                st = q.stats
                logger.info("%s: %s rel_loss %s  %.2f s", name, st.get("method"),
                            "-" if st.get("rel_loss") is None else f"{st['rel_loss']:.4g}", st.get("time", 0.0))
            with prof.timed("write_back"):
                slot.write(torch.from_numpy(q.dequantize()))
            self.results[name] = q
            if self.callback is not None:
                self.callback(name, q)
            other += time.perf_counter() - t1
        prof.add("solve", max(0.0, time.perf_counter() - t_solve - other))


def _layer_specs_iv(layer_specs, spec):
    """``layer_specs`` as a dict, every value a spec of `spec`'s method."""
    if layer_specs is None:
        return {}
    if not isinstance(layer_specs, dict):
        raise ParameterError("layer_specs", f"`layer_specs` must be a dict of layer name to spec, got "
                             f"{type(layer_specs).__name__}")
    for name, s in layer_specs.items():
        if type(s) is not type(spec) or s.method != spec.method:
            raise ParameterError("layer_specs", f"`layer_specs[{name!r}]` must be a {type(spec).__name__} of "
                                 f"method {spec.method!r} like `spec`, got {s!r}")
    return dict(layer_specs)


def _cancel(futures):
    """Best-effort cancel of futures nobody will wait for (the first error is what matters)."""
    for fut in futures:
        try:
            getattr(fut, "cancel", lambda: None)()
        except Exception:  # noqa: BLE001 - e.g. a client whose cluster is already gone
            logger.debug("could not cancel %r", fut, exc_info=True)


def _calibrate(model, blocks, selected, windows, run, *, bar, true_sequential, batch_size, home, target,
               report, single_pass):
    """The block loop: capture inputs, collect statistics per stage, hand layers to `run`.

    With `target` (the device path) the captured block inputs are moved there and each
    block is onloaded (``block.to(target)``) for its turn and offloaded (``block.to(home)``)
    after it, also when the turn raises."""
    spec = run.spec
    prof = run.profile
    joint = spec.joint
    with prof.timed("capture_inputs"):
        inps = first_block_inputs(model, blocks, windows, batch_size, home)
        if target is not None:
            inps = to_device(inps, target)
    qstream = [h for h, _, _ in inps]  # X̃: block inputs from the quantized model, per batch
    fstream = [h.clone() for h in qstream] if joint else None  # X: float block inputs
    extras = [(r, k) for _, r, k in inps]
    del inps
    n_tok = sum(h.shape[0] * h.shape[1] for h in qstream)
    alpha_m = spec.alpha_beta
    n_seq = windows.shape[0]
    stats_kw = {} if target is None else {"device": target, "dtype": torch.float32}
    blocks_name = find_blocks(model)[0]
    group_cache = {}
    if joint and getattr(spec, "d_shrink", None):  # D in two folds, shrunk by their difference
        stats_kw["d_shrink"] = spec.d_shrink

    for bi in bar:
        block = blocks[bi]
        layers = selected.get(bi, {})
        t0 = time.perf_counter()
        prof.start_block()
        if target is not None:
            block.to(target)
        try:
            qstream, fstream = _block_turn(block, layers, qstream, fstream, extras, run, joint=joint,
                                           true_sequential=true_sequential, alpha_m=alpha_m, n_seq=n_seq,
                                           n_tok=n_tok, stats_kw=stats_kw, single_pass=single_pass,
                                           group_cache=group_cache, prefix=f"{blocks_name}.{bi}.")
        except BaseException:
            prof.abort_block()
            raise
        finally:
            if target is not None:
                block.to(home)
        if target is not None and target.type == "cuda":
            torch.cuda.synchronize(target)
        dt = time.perf_counter() - t0
        prof.end_block(dt)
        report["block_seconds"].append(dt)
        logger.info("block %d done in %.1f s (%s)", bi, dt, ", ".join(
            f"{k} {v:.1f}" for k, v in prof.blocks[-1].items() if k != "total" and v >= 0.05))


def _stage_items(stage, stats, layers, slots, run, n_tok):
    """``[(slot, H, D, extra stats), ...]`` of the groups `stage` from their statistics
    (``{lead: LayerStatistics or ExpertsStatistics}``); a group without any is loaded
    from the checkpoint."""
    items = []
    for g in stage:
        lead = next((n for n in g if n in stats and not isinstance(layers[n], ExpertsPart)), None)
        if lead is not None:
            st = stats.pop(lead)
            # device path: float64 tensors where the sums are; host path: numpy
            Hn, Dn = st.mean_tensors(n_tok) if run.target is not None else st.mean(n_tok)
            del st
        else:
            Hn = Dn = None  # every layer of the group is in the checkpoint
        for name in g:
            if isinstance(layers[name], ExpertsPart):
                est = stats.get(name)
                for s in slots[name]:
                    if est is None:
                        items.append((s, None, None, {}))
                        continue
                    He, fell_back = est.mean(s.expert, run.min_expert_tokens)
                    items.append((s, He, None, {"tokens": est.count[s.expert], "fallback": fell_back}))
            else:
                items.extend((s, Hn, Dn, {}) for s in slots[name])
    return items


def _groups(block, layers, probe, cache, prefix):
    """:func:`layer_groups` of `block`, probed once per block class and set of
    block-relative layer names (`cache`): blocks of one class have one data flow."""
    if cache is None or not all(n.startswith(prefix) for n in layers):
        return layer_groups(block, layers, probe)
    key = (type(block), tuple(n[len(prefix):] for n in layers))
    if key not in cache:
        cache[key] = [[n[len(prefix):] for n in g] for g in layer_groups(block, layers, probe)]
    return [[prefix + r for r in g] for g in cache[key]]


def _block_turn(block, layers, qstream, fstream, extras, run, *, joint, true_sequential, alpha_m, n_seq,
                n_tok, stats_kw, single_pass=True, group_cache=None, prefix=""):
    """One block: statistics per stage, solves, then the streams through the quantized
    (and, for joint methods, float) block. Returns the next ``(qstream, fstream)``."""
    prof = run.profile
    # groups of layers reading the same input tensor, in execution order (the block's
    # data flow); a stage is what is solved between two capture passes
    t = time.perf_counter()
    groups = _groups(block, layers, (qstream[0], *extras[0]), group_cache, prefix) if layers else []
    prof.add("forward_capture", time.perf_counter() - t)
    stages = [[g] for g in groups] if true_sequential else ([groups] if groups else [])
    slots = {n: _slots(layers[n], layers, n) for g in groups for n in g}

    def pending(n):
        return not all(run.done(s.name) for s in slots[n])

    # what a capture pass hooks per group: the first linear layer (its input is the
    # group's input) and every fused experts weight (per-expert statistics)
    def hooked(g):
        lin = [n for n in g if not isinstance(layers[n], ExpertsPart)]
        lead = lin[:1] if any(pending(n) for n in lin) else []  # the first one: α is seeded by its name
        return lead + [n for n in g if isinstance(layers[n], ExpertsPart) and pending(n)]

    todo = [n for g in groups for n in hooked(g) if not isinstance(layers[n], ExpertsPart)]

    # Float pass (joint methods), before anything in this block is quantized, so the
    # block itself is the float block: keep the float inputs of the groups to solve.
    finputs = {lead: [] for lead in todo} if joint else None
    if joint:
        def keep(name, m, args):
            finputs[name].append(args[0].reshape(-1, args[0].shape[-1]).clone())

        t = time.perf_counter()
        with forward_pre_hooks({n: layers[n] for n in todo}, keep):
            fstream = [run_block(block, h, *e) for h, e in zip(fstream, extras)]
        prof.add("forward_float", time.perf_counter() - t)

    if single_pass and true_sequential and groups and _lockstep_fits(groups, layers):
        qstream = _single_pass(block, groups, layers, slots, qstream, extras, finputs, run, hooked=hooked,
                               alpha_m=alpha_m, n_seq=n_seq, n_tok=n_tok, stats_kw=stats_kw)
        return qstream, fstream

    for stage in stages:
        leads = [n for g in stage for n in hooked(g)]
        stats = {}
        if leads:
            t = time.perf_counter()
            stats, t_stats = _capture(block, {n: layers[n] for n in leads}, qstream, extras, finputs,
                                      alpha_m=alpha_m, n_seq=n_seq, seed=run.seed, stop_early=true_sequential,
                                      stats_kw=stats_kw, min_tokens=run.min_expert_tokens)
            prof.add("forward_capture", time.perf_counter() - t - t_stats)
            prof.add("statistics", t_stats)
            if finputs is not None:  # folded into D: the float copies are not needed any more
                for n in leads:
                    finputs.pop(n, None)
        with prof.timed("statistics"):
            items = _stage_items(stage, stats, layers, slots, run, n_tok)
        run.finish_all(items)
        items = None  # free the statistics before the next capture pass
    finputs = None
    # the next quantized stream goes through the (now quantized) block
    t = time.perf_counter()
    out = [run_block(block, h, *e) for h, e in zip(qstream, extras)]
    prof.add("forward_propagate", time.perf_counter() - t)
    return out, fstream


def _lockstep_fits(groups, layers):
    """The single pass hooks each group at the first call of one of its modules: every
    group must then see all its statistics' inputs there. A group mixing fused experts
    with other layers (the experts' routing arrives with the experts call only) or the
    experts of two modules does not fit (the block then takes the capture passes)."""
    for g in groups:
        parts = [layers[n] for n in g if isinstance(layers[n], ExpertsPart)]
        if parts and (len(parts) != len(g) or len({p.experts_name for p in parts}) != 1):
            return False
    return True


class _Abort(Exception):
    """Stops a batch thread of the single pass after an error elsewhere."""


class _Lockstep:
    """The batches of one block, each in a thread, stopped together at each group.

    A thread runs its batch through the block; at the first call of a module of group
    ``gi`` (a forward pre-hook) it records the call's arguments, gives up the compute
    token and waits until every batch has reached ``gi`` (a batch that never calls the
    group counts as arrived when it ends). The coordinating (calling) thread then
    computes the group's statistics from the recorded inputs, in batch order, solves the
    group and writes its quantized weights, and lets the threads go on: the modules of
    the group, and everything after them, run on quantized weights, as the capture
    passes of GPTQ's true-sequential order would see them. One thread computes at a time
    (the token): the forward work of the batches is done once, in the same operations
    as a sequential loop over the batches.
    """

    def __init__(self, n_batches, n_groups, device=None):
        self.n, self.n_groups = n_batches, n_groups
        self.device = device  # the batches' device: a CUDA one is made current in each thread
        self.cv = threading.Condition()
        self.token = threading.Lock()
        self.arrived = [0] * n_groups
        self.released = [False] * n_groups
        self.inputs = [[None] * n_batches for _ in range(n_groups)]
        self.error = None
        self.local = threading.local()

    def _arrive(self, upto):
        """Arrive at the groups up to `upto` (the caller holds `cv`)."""
        loc = self.local
        while loc.next <= upto:
            self.arrived[loc.next] += 1
            loc.next += 1
        self.cv.notify_all()

    def hook(self, gis, args):
        """In a batch thread, at a call of a module of the groups `gis` (in order)."""
        loc = self.local
        for gi in gis:
            if gi < loc.next:
                continue  # a module called again: its group is done
            self.inputs[gi][loc.batch] = args
            self.token.release()
            loc.has_token = False
            with self.cv:
                self._arrive(gi)
                self.cv.wait_for(lambda: self.released[gi] or self.error is not None)
                if self.error is not None:
                    raise _Abort()
            self.token.acquire()
            loc.has_token = True

    def run_batch(self, b, fn, out):
        loc = self.local
        loc.batch, loc.next, loc.has_token = b, 0, False
        try:
            self.token.acquire()
            loc.has_token = True
            if self.error is not None:
                raise _Abort()
            with torch.no_grad(), (torch.cuda.device(self.device) if self.device is not None
                                   and self.device.type == "cuda" else contextlib.nullcontext()):
                out[b] = fn()
        except _Abort:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the coordinator
            with self.cv:
                if self.error is None:
                    self.error = err
                self.cv.notify_all()
        finally:
            if loc.has_token:
                self.token.release()
            with self.cv:
                self._arrive(self.n_groups - 1)

    def coordinate(self, on_group):
        """In the calling thread: run ``on_group(gi)`` for each group once every batch got there."""
        for gi in range(self.n_groups):
            with self.cv:
                self.cv.wait_for(lambda: self.arrived[gi] == self.n or self.error is not None)
                if self.error is not None:
                    return
            try:
                on_group(gi)
            except BaseException as err:
                with self.cv:
                    self.error = err
                    self.cv.notify_all()
                return
            finally:
                self.inputs[gi] = None
            with self.cv:
                self.released[gi] = True
                self.cv.notify_all()


def _single_pass(block, groups, layers, slots, qstream, extras, finputs, run, *, hooked, alpha_m, n_seq, n_tok,
                 stats_kw):
    r"""The true-sequential block in one pass over the quantized stream (:class:`_Lockstep`):
    returns the block's outputs (the next quantized stream).

    Same statistics, solves and outputs as the capture passes followed by the
    propagation pass, operation for operation (the sums in batch order); the memory
    held is what every batch holds at its group's input at once (the block's live
    activations for the whole calibration set at that point: for a Llama block at most
    the hidden states, the residual and the MLP's intermediate activation of every token).
    """
    prof = run.profile
    n = len(qstream)
    seq0 = np.cumsum([0] + [h.shape[0] for h in qstream]).tolist()
    modules = {}  # hooked module key -> (module, [group indices])
    for gi, g in enumerate(groups):
        for name in g:
            layer = layers[name]
            key = getattr(layer, "experts_name", name)
            entry = modules.setdefault(key, (hook_module(layer), []))
            if gi not in entry[1]:
                entry[1].append(gi)
    step = _Lockstep(n, len(groups), qstream[0].device)
    spent = [0.0]

    def on_group(gi):
        t0 = time.perf_counter()
        g = groups[gi]
        recorded = step.inputs[gi]
        stats = {}
        for lead in hooked(g):
            layer = layers[lead]
            if isinstance(layer, ExpertsPart):
                est = ExpertsStatistics(layer)
                for args in recorded:
                    if args is not None:
                        est.add(args[0], args[1])
                short = est.short(run.min_expert_tokens)
                if short:
                    logger.info("experts with fewer than %d routed tokens use the shared statistics: %s",
                                run.min_expert_tokens, {lead: short})
                    for args in recorded:
                        if args is not None:
                            est.add(args[0], args[1], all_tokens=True, only=short)
                stats[lead] = est
                continue
            alphas = None if alpha_m is None else torch.from_numpy(
                fold_beta(layer_rng(run.seed, lead), alpha_m, size=n_seq)).float()
            st = LayerStatistics(linear_in_features(layer), joint=finputs is not None, alphas=alphas, **stats_kw)
            for b, args in enumerate(recorded):
                if args is not None:
                    st.add(args[0], None if finputs is None else finputs[lead][b], seq=seq0[b])
                if finputs is not None:
                    finputs[lead][b] = None  # folded into D: the float copy is not needed any more
            stats[lead] = st
        items = _stage_items([g], stats, layers, slots, run, n_tok)
        prof.add("statistics", time.perf_counter() - t0)
        run.finish_all(items)
        del items, stats
        # every batch thread waits here: give their arenas' freed pages back before they go on
        trim_memory()
        spent[0] += time.perf_counter() - t0

    out = [None] * n
    t = time.perf_counter()
    with forward_pre_hooks({k: m for k, (m, _) in modules.items()},
                           lambda key, m, args: step.hook(modules[key][1], args)):
        threads = [threading.Thread(target=step.run_batch, daemon=True, name=f"calibration-batch-{b}",
                                    args=(b, lambda h=h, e=e: run_block(block, h, *e), out))
                   for b, (h, e) in enumerate(zip(qstream, extras))]
        for th in threads:
            th.start()
        try:
            step.coordinate(on_group)
        except BaseException as err:  # e.g. KeyboardInterrupt while waiting: stop the batches
            with step.cv:
                step.error = step.error or err
                step.cv.notify_all()
            raise
        finally:
            for th in threads:
                th.join()
    prof.add("forward_propagate", max(0.0, time.perf_counter() - t - spent[0]))
    if step.error is not None:
        raise step.error
    return out


def _capture(block, leads, qstream, extras, finputs, *, alpha_m, n_seq, seed, stop_early, stats_kw, min_tokens):
    r"""Run the block on the quantized stream and return ``({lead: LayerStatistics or
    ExpertsStatistics}, seconds spent accumulating)`` for the layers `leads` (``{name: module or ExpertsPart}``).

    With ``stop_early`` (one stage) the pass stops at the last lead's input: nothing after it
    is needed. Per-sequence α (``alpha_m`` = Beta parameter) is drawn from
    ``(seed, lead)`` and folded into ``D``. Fused experts routed fewer than `min_tokens`
    tokens get a second pass collecting the shared (all-token) statistics.
    """
    acc = {}
    for lead, layer in leads.items():
        if isinstance(layer, ExpertsPart):
            acc[lead] = ExpertsStatistics(layer)
            continue
        alphas = None if alpha_m is None else torch.from_numpy(
            fold_beta(layer_rng(seed, lead), alpha_m, size=n_seq)).float()
        acc[lead] = LayerStatistics(linear_in_features(layer), joint=finputs is not None, alphas=alphas,
                                    **stats_kw)
    state = {"batch": 0, "seq": 0, "left": set(), "mode": None, "seconds": 0.0}
    hooks = {n: hook_module(layer) for n, layer in leads.items()}

    def accumulate(name, m, args):
        if name not in state["left"]:
            return
        t0 = time.perf_counter()
        if isinstance(leads[name], ExpertsPart):
            if state["mode"] is None:
                acc[name].add(args[0], args[1])
            else:
                acc[name].add(args[0], args[1], all_tokens=True, only=state["mode"][name])
        else:
            x_float = None if finputs is None else finputs[name][state["batch"]]
            acc[name].add(args[0], x_float, seq=state["seq"])
        state["seconds"] += time.perf_counter() - t0
        state["left"].discard(name)
        if stop_early and not state["left"]:
            raise StopForward()

    def one_pass(names):
        state["seq"] = 0
        for b, (h, e) in enumerate(zip(qstream, extras)):
            state["batch"], state["left"] = b, set(names)
            try:
                run_block(block, h, *e)
            except StopForward:
                pass
            state["seq"] += h.shape[0]

    with forward_pre_hooks(hooks, accumulate):
        one_pass(list(leads))
        short = {n: a.short(min_tokens) for n, a in acc.items() if isinstance(a, ExpertsStatistics)}
        short = {n: s for n, s in short.items() if s}
        if short:
            logger.info("experts with fewer than %d routed tokens use the shared statistics: %s", min_tokens,
                        {n: s for n, s in short.items()})
            state["mode"] = short
            one_pass(list(short))
    return acc, state["seconds"]

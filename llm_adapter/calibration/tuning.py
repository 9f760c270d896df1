r"""Scale tuning after the codes are fixed: distillation of the float model's next-token
distribution into the quantized model (:func:`tune_scales`).

Every layer's codes and integer zero points stay as the quantization method chose them;
only the continuous parameters move: each group's scale, and optionally the RMSNorm
weights of the model. The loss is the Kullback–Leibler divergence from the float model to
the quantized one, token by token, on the calibration windows:

.. math::

    L(\theta) = \frac{1}{N T} \sum_{n, t} \mathrm{KL}\big(p_\text{float}(\cdot \mid x_{n, <t})
               \,\|\, p_\theta(\cdot \mid x_{n, <t})\big),
    \qquad W_\theta[j, i] = s_{j, g(i)} e^{\theta_{j, g(i)}} \, (c_{j i} - z_{j, g(i)}),

so the target is the float model's behaviour, not the calibration text itself: the
gradient does not depend on which token came next, only on what the float model predicted.
All layers are tuned together through the whole network, so they can compensate each
other's errors beyond one block (what the layer-wise methods cannot).

The float model's distributions are computed once, before tuning, and kept as their
``top_k`` largest log-probabilities plus the log of the remaining mass; the loss is the
exact KL divergence between the two distributions coarsened to those ``top_k + 1`` bins
(a lower bound of the full KL that equals it when the rest mass is 0). One window of
SmolLM2-135M costs about 4e11 FLOPs forward + backward (3 × 2 × 135e6 × 512), a few
seconds on a 2-core CPU: a few hundred steps are minutes, where a block-wise reconstruction
would cost the same per step and not couple the blocks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ParameterError

__all__ = ["TuneResult", "tune_scales"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune_scales` returns.

    Attributes
    ----------
    layers : dict of str to QuantizedLayer
        The tuned layers (same codes, zeros and ``g_idx``; new scales, float32 holding
        float16-representable values; ``stats["tune"]`` records the run).
    norms : dict of str to torch.Tensor
        The tuned RMSNorm weights by parameter name (empty unless ``norms=True``); they are
        also written into the model. The native format stores quantized layers only, so
        these must be saved with the model (e.g. its state dict) to survive a reload.
    holdout_kl : dict
        Mean KL divergence on the held-out windows: ``"before"`` (the layers as given),
        ``"best"`` (float32 scales of the kept step), ``"after"`` (the returned, float16-rounded
        scales).
    best_step : int
        The step whose parameters were kept (0: none beat the starting point).
    steps : int
        Steps taken (fewer than asked when early stopping triggered).
    seconds : float
        Wall time of the whole call (teacher pass included).
    history : list of dict
        One entry per evaluation: ``step``, ``train_kl`` (mean over the steps since the last
        evaluation), ``holdout_kl``, ``seconds``.
    """

    layers: dict
    norms: dict
    holdout_kl: dict
    best_step: int
    steps: int
    seconds: float
    history: list = field(default_factory=list)


def _iv(model, layers, windows, steps, lr, top_k, holdout, batch_size, eval_every, patience):
    from ..methods.uniform import QuantizedLayer

    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.dtype.is_floating_point:
        raise ParameterError("windows", "`windows` must be a 2-D integer torch.Tensor (n_windows, T)")
    if windows.shape[0] < 2:
        raise ParameterError("windows", f"`windows` needs at least 2 windows (training + held-out), got {windows.shape[0]}")
    for name, value, low in (("steps", steps, 0), ("top_k", top_k, 1), ("batch_size", batch_size, 1),
                             ("eval_every", eval_every, 1), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ParameterError(name, f"`{name}` must be an int >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ParameterError("lr", f"`lr` must be a finite float > 0, got {lr!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise ParameterError("holdout", f"`holdout` must be a float in (0, 1), got {holdout!r}")
    if not isinstance(layers, dict) or not layers:
        raise ParameterError("layers", "`layers` must be a non-empty dict of module name -> QuantizedLayer")
    modules = {}
    for name, q in layers.items():
        if not isinstance(q, QuantizedLayer):
            raise ParameterError("layers", f"`layers[{name!r}]` is a {type(q).__name__}; only uniform-grid "
                                           "QuantizedLayer scales can be tuned")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ParameterError("layers", f"`layers[{name!r}]` names no module of the model") from None
        if not isinstance(mod, torch.nn.Linear):
            raise ParameterError("layers", f"`layers[{name!r}]` is a {type(mod).__name__}; scale tuning supports "
                                           "torch.nn.Linear modules")
        if tuple(mod.weight.shape) != tuple(q.shape):
            raise ParameterError("layers", f"`layers[{name!r}]` has shape {q.shape}, the module's weight "
                                           f"{tuple(mod.weight.shape)}")
        modules[name] = mod
    return modules


def _norm_params(model):
    """``{parameter name: tensor}`` of the model's RMSNorm weights (1-D ``weight`` of a module
    whose class name contains ``RMSNorm``)."""
    out = {}
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if "rmsnorm" in type(mod).__name__.lower() and isinstance(w, torch.nn.Parameter) and w.ndim == 1:
            out[f"{mname}.weight" if mname else "weight"] = w
    return out


def _logits(model, ids, params=None):
    if params is None:
        return model(input_ids=ids, use_cache=False).logits
    return torch.func.functional_call(model, params, args=(), kwargs={"input_ids": ids, "use_cache": False},
                                      strict=False).logits


def _rest_logprob(logp, idx):
    """``log(1 - sum(exp(logp[..., idx])))`` exactly: the log-sum-exp over the complement."""
    return torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)


def _teacher(model, windows, top_k):
    """The float model's top-k log-probabilities, their indices and the log rest mass, per window."""
    out = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(_logits(model, w[None]).float(), dim=-1)[0]
            k = min(top_k, logp.shape[-1])
            top, idx = torch.topk(logp, k, dim=-1)
            rest = _rest_logprob(logp, idx) if k < logp.shape[-1] else torch.full(top.shape[:-1], float("-inf"))
            out.append((top, idx, rest))
    return out


def _kl(logits, teacher):
    """Mean over tokens of KL(teacher || student) on the ``top_k + 1`` bins."""
    top, idx, rest = teacher
    logq = torch.log_softmax(logits.float(), dim=-1).reshape(top.shape[:-1] + logits.shape[-1:])
    q_top = logq.gather(-1, idx)
    p_top = top.exp()
    kl = (p_top * (top - q_top)).sum(-1)
    if idx.shape[-1] < logq.shape[-1]:
        q_rest = _rest_logprob(logq, idx)
        p_rest = rest.exp()
        kl = kl + torch.where(p_rest > 0, p_rest * (rest - q_rest), torch.zeros_like(kl))
    return kl.mean()


def tune_scales(model, layers, windows, *, steps=200, lr=1e-3, norms=False, top_k=256, holdout=0.125,
                batch_size=1, eval_every=25, patience=4, seed=0, progress=True) -> TuneResult:
    r"""Tune the group scales of quantized layers (codes and zeros fixed) by distilling the
    float model's next-token distributions.

    Each scale is parametrised as :math:`s\,e^{\theta}` (:math:`\theta = 0` at the start,
    so ``lr`` is a relative step and scales stay positive); with ``norms=True`` each RMSNorm
    weight as :math:`w (1 + \phi)`. Adam minimises the mean token KL divergence
    :math:`\mathrm{KL}(p_\text{float} \| p_\theta)` (module docstring) over the training
    windows; every ``eval_every`` steps the mean KL on the held-out windows (a slice of
    `windows`, never an evaluation text) is measured, the parameters of the best evaluation
    so far are kept, and tuning stops after ``patience`` evaluations without improvement.
    Step 0 (the layers as given) is a candidate, so the held-out KL never gets worse.
    At the end the scales are rounded to float16 (the stored precision), checked finite and
    positive, and the held-out KL is measured again with them.

    Parameters
    ----------
    model : transformers causal LM
        Holding the **float** weights of the layers in `layers` (the teacher). On return it
        holds the tuned dequantized weights (and tuned norm weights with ``norms=True``), as
        after :func:`~llm_adapter.calibration.quantize_model`. Its parameters' gradients
        are not touched.
    layers : dict of str to QuantizedLayer
        Module name (a ``torch.nn.Linear`` of `model`) to its quantized layer, e.g. from
        :func:`~llm_adapter.calibration.quantize_model` or
        :func:`~llm_adapter.formats.load_quantized`. Not modified.
    windows : (n_windows, T) integer torch.Tensor
        Calibration windows; ``max(1, round(holdout * n_windows))`` of them (a seeded draw)
        are held out for early stopping, the rest are trained on.
    steps : int >= 0
        Optimiser steps (each on ``batch_size`` training windows, in a seeded order, epoch
        after epoch). 0: only measure and round.
    lr : float > 0
        Adam's learning rate (relative: about ``lr`` × the scale per step).
    norms : bool
        Also tune the RMSNorm weights.
    top_k : int >= 1
        Float-model probabilities kept per token (the rest as one bin).
    holdout : float in (0, 1)
        Fraction of `windows` held out.
    batch_size, eval_every, patience : int >= 1
        Windows per step; steps between held-out evaluations; evaluations without
        improvement before stopping.
    seed : int
        Seeds the held-out draw and the window order: the result is deterministic.
    progress : bool
        Log progress at INFO level (otherwise DEBUG).

    Returns
    -------
    TuneResult

    Raises
    ------
    ParameterError
        If an argument breaks its rule (the message names it), a layer is not a uniform
        :class:`~llm_adapter.methods.uniform.QuantizedLayer`, or names no ``torch.nn.Linear``
        of `model` of its shape.
    FloatingPointError
        If a tuned scale is not finite or not a positive float16 value (never silently stored).

    Notes
    -----
    Cost per step: one forward and backward pass of the model on ``batch_size`` windows
    (≈ 6 × parameters × tokens FLOPs), plus rebuilding every tuned weight (elementwise). The
    float model runs once per window before tuning. Memory: the teacher cache
    (``n_windows × T × top_k`` log-probabilities and indices), one extra copy of the tuned
    weights (their ``codes - zeros``) and the activations of one batch.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from llm_adapter import QuantSpec
    >>> from llm_adapter.calibration import quantize_model
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> float_state = {k: v.clone() for k, v in model.state_dict().items()}
    >>> windows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    >>> layers = quantize_model(model, windows, QuantSpec(bits=2, group_size=16, method="rtn"),
    ...                         progress=False)
    >>> _ = model.load_state_dict(float_state)  # the teacher: float weights
    >>> res = tune_scales(model, layers, windows, steps=20, lr=1e-2, eval_every=5, progress=False)
    >>> res.holdout_kl["after"] <= res.holdout_kl["before"]
    True
    >>> q0, q1 = layers["model.layers.0.mlp.up_proj"], res.layers["model.layers.0.mlp.up_proj"]
    >>> bool((q0.codes == q1.codes).all()), q1.scales.dtype.name
    (True, 'float32')
    """
    t0 = time.perf_counter()
    modules = _iv(model, layers, windows, steps, lr, top_k, holdout, batch_size, eval_every, patience)
    log = logger.info if progress else logger.debug
    n = int(windows.shape[0])
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_hold = min(n - 1, max(1, round(holdout * n)))
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]
    dev = next(model.parameters()).device
    windows = windows.to(dev)

    was_training = model.training
    model.eval()
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    float_weights = {name: mod.weight.detach().clone() for name, mod in modules.items()}
    norm_params = _norm_params(model) if norms else {}
    norm0 = {k: v.detach().clone() for k, v in norm_params.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        teacher = _teacher(model, windows, top_k)
        log("tune: float model's top-%d distributions of %d windows in %.1f s (%d held out)",
            top_k, n, time.perf_counter() - t0, n_hold)

        # the student: W = s0 * exp(theta)[:, g] * (codes - zeros[:, g]); optional w = w0 * (1 + phi)
        base, thetas = {}, {}
        for name, q in layers.items():
            g = torch.from_numpy(np.asarray(q.g_idx, dtype=np.int64)).to(dev)
            offset = torch.from_numpy(q.codes.astype(np.float32) - np.asarray(q.zeros, np.float32)[:, q.g_idx])
            s0 = torch.from_numpy(np.asarray(q.scales, dtype=np.float32).copy())
            base[name] = (offset.to(dev), s0.to(dev), g)
            thetas[name] = torch.zeros_like(s0, device=dev, requires_grad=True)
        phis = {k: torch.zeros_like(v, requires_grad=True) for k, v in norm0.items()}
        wdtype = {name: mod.weight.dtype for name, mod in modules.items()}

        def params(scales=None):
            out = {}
            for name, (offset, s0, g) in base.items():
                s = s0 * torch.exp(thetas[name]) if scales is None else scales[name]
                out[f"{name}.weight"] = (s[:, g] * offset).to(wdtype[name])
            for k, phi in phis.items():
                out[k] = norm0[k] * (1 + phi)
            return out

        def holdout_kl(scales=None):
            with torch.no_grad():
                p = params(scales)
                return float(np.mean([_kl(_logits(model, windows[i][None], p), teacher[i]).item()
                                      for i in hold_idx.tolist()]))

        tuned = list(thetas.values()) + list(phis.values())
        opt = torch.optim.Adam(tuned, lr=float(lr))
        kl0 = holdout_kl()
        best = (kl0, 0, [t.detach().clone() for t in tuned])
        history = [{"step": 0, "train_kl": None, "holdout_kl": kl0, "seconds": time.perf_counter() - t0}]
        log("tune: step 0 held-out KL %.5f", kl0)
        order, pos, run_kl, bad, step = [], 0, [], 0, 0
        t_steps = time.perf_counter()
        for step in range(1, steps + 1):
            if pos + batch_size > len(order):
                order = train_idx[torch.randperm(len(train_idx), generator=gen)].tolist()
                order = order * -(-batch_size // max(1, len(order)))
                pos = 0
            batch = order[pos:pos + batch_size]
            pos += batch_size
            opt.zero_grad(set_to_none=True)
            p = params()
            loss = sum(_kl(_logits(model, windows[i][None], p), teacher[i]) for i in batch) / len(batch)
            loss.backward()
            opt.step()
            run_kl.append(loss.item())
            if step % 10 == 0:
                log("tune: step %d/%d train KL %.5f (last 10 steps), %.1f s a step so far", step, steps,
                    np.mean(run_kl[-10:]), (time.perf_counter() - t_steps) / step)
            if step % eval_every == 0 or step == steps:
                kl = holdout_kl()
                history.append({"step": step, "train_kl": float(np.mean(run_kl)), "holdout_kl": kl,
                                "seconds": time.perf_counter() - t0})
                log("tune: step %d train KL %.5f held-out KL %.5f (%.0f s)", step, np.mean(run_kl), kl,
                    time.perf_counter() - t0)
                run_kl = []
                if kl < best[0]:
                    best, bad = (kl, step, [t.detach().clone() for t in tuned]), 0
                else:
                    bad += 1
                    if bad >= patience:
                        log("tune: no held-out improvement in %d evaluations, stopping at step %d", patience, step)
                        break
        with torch.no_grad():
            for t, b in zip(tuned, best[2]):
                t.copy_(b)
            # float16 scales (the stored precision), re-checked
            scales = {}
            for name, (_, s0, _) in base.items():
                s = (s0 * torch.exp(thetas[name])).to(torch.float16).to(torch.float32)
                if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                    raise FloatingPointError(f"tuned scales of {name!r} are not positive finite float16 values")
                scales[name] = s
            kl_after = holdout_kl(scales)
            final = params(scales)
        log("tune: kept step %d; held-out KL %.5f -> %.5f (float16 scales %.5f) in %.0f s",
            best[1], kl0, best[0], kl_after, time.perf_counter() - t0)
    except BaseException:
        with torch.no_grad():  # leave the model as it came
            for name, mod in modules.items():
                mod.weight.copy_(float_weights[name])
            for k, v in norm_params.items():
                v.copy_(norm0[k])
        raise
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        model.train(was_training)

    seconds = time.perf_counter() - t0
    info = {"steps": step, "best_step": best[1], "lr": float(lr), "norms": bool(norms),
            "holdout_kl_before": kl0, "holdout_kl_after": kl_after, "seconds": seconds}
    out = {}
    with torch.no_grad():
        for name, mod in modules.items():
            mod.weight.copy_(final[f"{name}.weight"])
            q = layers[name]
            out[name] = dataclasses.replace(q, scales=scales[name].cpu().numpy(),
                                            stats={**copy.deepcopy(q.stats), "tune": info})
        tuned_norms = {}
        for k, v in norm_params.items():
            v.copy_(final[k])
            tuned_norms[k] = v.detach().clone()
    return TuneResult(layers=out, norms=tuned_norms,
                      holdout_kl={"before": kl0, "best": best[0], "after": kl_after},
                      best_step=best[1], steps=info["steps"], seconds=seconds, history=history)

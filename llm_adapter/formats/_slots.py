"""The quantized weights of a model, by parameter name, for the exporters (shared by the
GPTQ and compressed-tensors checkpoints).

A ``Linear``/``Conv1D`` weight is one slot; a fused MoE expert weight ``(E, rows, in)`` is
``E`` consecutive slots (expert ``e`` = the weight's first slot + ``e``).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def quantized_slots(model, modules, layers, error):
    """``(slot_layer, quantized, fused)`` of the quantized `layers` of `model`.

    ``slot_layer`` lists ``(layer name, layer)`` per slot; ``quantized`` maps a parameter
    name to ``(first slot, rows)``; ``fused`` maps a fused parameter name to
    ``{expert: (layer name, layer)}``. A fused weight with some experts not quantized
    raises `error` (an exception class): a checkpoint holds all experts of a weight or none.
    """
    from ..nn.fused import expert_slot

    slot_layer, quantized, fused = [], {}, {}
    for name, layer in layers.items():
        if name in modules:
            quantized[f"{name}.weight"] = (len(slot_layer), layer.shape[0])
            slot_layer.append((name, layer))
        else:
            _, _, e = expert_slot(modules, name)
            fused.setdefault(name.rsplit(".", 1)[0], {})[e] = (name, layer)
    for pname, experts in fused.items():
        n_exp = model.get_parameter(pname).shape[0]
        missing = [e for e in range(n_exp) if e not in experts]
        if missing:
            raise error(f"fused weight {pname!r}: experts {missing} are not quantized (a checkpoint holds "
                        "all experts of a weight or none)")
        quantized[pname] = (len(slot_layer), experts[0][1].shape[0])
        slot_layer.extend(experts[e] for e in range(n_exp))
    return slot_layer, quantized, fused


def row_layer(layer, rows):
    """The uniform layer made of rows `rows` of `layer` (rows are independent)."""
    return dataclasses.replace(layer, codes=np.asarray(layer.codes)[rows], scales=np.asarray(layer.scales)[rows],
                               zeros=np.asarray(layer.zeros)[rows], perm=None, bias=None, stats={})

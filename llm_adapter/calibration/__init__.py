"""Block-by-block calibration of a causal LM: model structure (:mod:`.blocks`), hooks
(:mod:`.hooks`), statistics (:mod:`.statistics`), checkpoints (:mod:`.checkpoints`) and the
driver (:mod:`.driver`, :func:`quantize_model`) with its seam for layer solves
(:class:`LayerSolver`: :class:`InlineSolver`, :class:`ExecutorSolver`), and scale tuning after
the codes are fixed (:mod:`.tuning`, :func:`tune_scales`).
"""

from .blocks import find_blocks, select_linears
from .checkpoints import load_layer, save_layer
from .driver import ExecutorSolver, InlineSolver, LayerSolver, quantize_model, solve_layer
from .hooks import forward_pre_hooks
from .statistics import LayerStatistics
from .tuning import TuneResult, tune_scales

__all__ = ["ExecutorSolver", "InlineSolver", "LayerSolver", "LayerStatistics", "find_blocks", "forward_pre_hooks",
           "load_layer", "quantize_model", "save_layer", "select_linears", "solve_layer", "TuneResult",
           "tune_scales"]

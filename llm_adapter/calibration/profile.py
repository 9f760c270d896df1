"""Stage profile of a calibration run: where the wall time of :func:`quantize_model` goes.

Cheap by design: :func:`time.perf_counter` around each stage, no device synchronisation
(on a CUDA device a stage's figure is when its work was *queued*, except where the driver
synchronises anyway, at the end of each block).

Stages (seconds, per block and in total):

``capture_inputs``
    the model run up to its first block (the block-0 inputs of every batch).
``forward_capture``
    capture passes on the quantized stream (the old path: one per true-sequential group,
    stopped at the group's input), hook work excluded.
``forward_propagate``
    the pass producing the next block's quantized inputs (in the single-pass path this is
    the only pass over the quantized stream; the work done inside its hooks is excluded).
``forward_float``
    the float-stream pass of joint methods (``D``), keeping the float layer inputs.
``statistics``
    accumulating ``H`` (and ``D``) from the layer inputs.
``solve``
    the layer solves (the method's ``quantize``, or waiting for a remote solver), grid
    search excluded.
``grid_search``
    the grid (scales, zeros) of the layers, as the method reports it (``stats["time_grid"]``).
``write_back``
    dequantizing the codes into the model's weights.
``checkpoint_io``
    writing and reading per-layer checkpoints.
``sync``
    the rest of the block's wall time (thread hand-offs of the single-pass path, device
    synchronisation, bookkeeping).

:attr:`StageProfile.blocks` holds one ``{stage: seconds}`` dict per block and ``"total"``
the block's wall time; :meth:`StageProfile.totals` sums them (plus the run-level stages).
"""

from __future__ import annotations

import contextlib
import time

__all__ = ["STAGES", "StageProfile", "format_profile"]

#: The stage names, in display order.
STAGES = ("model_load", "capture_inputs", "forward_capture", "forward_propagate", "forward_float", "statistics",
          "solve", "grid_search", "write_back", "checkpoint_io", "sync")


class StageProfile:
    """Seconds per stage, per block and for the whole run.

    Examples
    --------
    >>> p = StageProfile()
    >>> p.start_block()
    >>> p.add("solve", 0.5); p.add("statistics", 0.25)
    >>> p.end_block(1.0)
    >>> t = p.totals()
    >>> t["solve"], t["statistics"], t["sync"], t["blocks"]
    (0.5, 0.25, 0.25, 1.0)
    """

    def __init__(self):
        self.run = {}  # run-level stages (model_load, capture_inputs)
        self.blocks = []  # one {stage: seconds} per finished block
        self._cur = None

    def add(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage` of the current block (or of the run outside a block)."""
        d = self.run if self._cur is None else self._cur
        d[stage] = d.get(stage, 0.0) + float(seconds)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Time the ``with`` body as `stage`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def start_block(self) -> None:
        """Open a block: the next :meth:`add` calls count for it."""
        self._cur = {}

    def end_block(self, wall: float) -> None:
        """Close the current block, `wall` its wall time: what no stage claimed is ``sync``."""
        cur = self._cur
        known = sum(cur.values())
        cur["sync"] = cur.get("sync", 0.0) + max(0.0, wall - known)
        cur["total"] = float(wall)
        self.blocks.append(cur)
        self._cur = None

    def abort_block(self) -> None:
        """Drop the current block (its turn raised)."""
        self._cur = None

    def totals(self) -> dict:
        """``{stage: seconds}`` over the run, ``"blocks"`` = the summed block wall times."""
        out = {k: v for k, v in self.run.items()}
        for b in self.blocks:
            for k, v in b.items():
                if k != "total":
                    out[k] = out.get(k, 0.0) + v
        out["blocks"] = sum(b["total"] for b in self.blocks)
        return out

    def as_dict(self) -> dict:
        """What goes into the run's report: ``{"totals": ..., "blocks": [...]}``."""
        return {"totals": self.totals(), "blocks": [dict(b) for b in self.blocks]}


def format_profile(profile: dict, *, per_block: bool = False) -> str:
    """A text table of a profile dict (:meth:`StageProfile.as_dict`): each stage's seconds
    and share of the total; with `per_block`, one line per block too.

    Examples
    --------
    >>> p = StageProfile(); p.start_block(); p.add("solve", 1.0); p.end_block(2.0)
    >>> print(format_profile(p.as_dict()))  # doctest: +NORMALIZE_WHITESPACE
    stage profile (s)
      solve     1.00   50.0 %
      sync      1.00   50.0 %
      total     2.00
    """
    tot = profile["totals"]
    wall = tot.get("wall", tot.get("blocks", 0.0) + tot.get("capture_inputs", 0.0)) + tot.get("model_load", 0.0)
    stages = [s for s in STAGES if tot.get(s)] + sorted(k for k in tot if k not in STAGES and k not in
                                                        ("blocks", "wall"))
    w = max([len(s) for s in stages] + [5])
    lines = ["stage profile (s)"]
    for s in stages:
        share = f"{100 * tot[s] / wall:6.1f} %" if wall > 0 else ""
        lines.append(f"  {s.ljust(w)}  {tot[s]:7.2f}  {share}")
    lines.append(f"  {'total'.ljust(w)}  {wall:7.2f}")
    if per_block:
        cols = [s for s in STAGES if any(b.get(s) for b in profile["blocks"])]
        lines.append("  block  " + "  ".join(c[:10].rjust(10) for c in cols) + "     total")
        for i, b in enumerate(profile["blocks"]):
            lines.append(f"  {i:5d}  " + "  ".join(f"{b.get(c, 0.0):10.2f}" for c in cols) + f"  {b['total']:8.2f}")
    return "\n".join(lines)

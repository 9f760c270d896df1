"""What to quantize a linear layer to, and how: :class:`QuantSpec`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["METHODS", "CLIPS", "ORDERINGS", "QuantSpec"]

#: Quantization methods understood by :func:`llm_adapter.quantize.quantize_weight`.
METHODS = ("rtn", "gptq", "ojbkq", "regcal")
#: Grid search rules.
CLIPS = ("minmax", "mse")
#: Column orderings (:data:`bils.ordering.ORDERINGS`); ``"diag"`` is GPTQ's act-order.
ORDERINGS = ("natural", "diag", "sqrd", "vblast", "minpivot")

_REGCAL_ALPHAS = ("sample", "closed_form")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class QuantSpec:
    r"""How one linear layer ``W`` (out, in) is quantized to a uniform integer grid.

    Every field is validated in ``__post_init__``; errors name the field.

    Grid
    ----
    bits : int, 2..8
        Codes are in ``[0, 2**bits - 1]``.
    group_size : int
        ``-1``: one (scale, zero) per output row ("per-channel"). Otherwise a positive
        number of consecutive input columns sharing a grid; when it does not divide
        ``in_features`` the last group is shorter.
    sym : bool
        Symmetric grid: zero point fixed at ``2**(bits-1)`` (GPTQ's ``(maxq + 1) / 2``),
        scale from ``max(|min|, |max|)``.
    clip : {"minmax", "mse"}
        ``"minmax"``: the range of the weights (widened to include 0, as GPTQ). ``"mse"``:
        GPTQ's shrink search (range ``p * [min, max]`` for ``p = 1, 0.99, …, 0.21``,
        keeping the ``p`` of least ``sum |w - ŵ|^2.4`` per row/group).

    Grids are always *static*: computed from the original ``W`` per group, in original
    column order, before any column is quantized (GPTQ's ``static_groups=True``). So the
    grid does not depend on the ordering, and ``g_idx[i] = i // group_size``.

    Solver
    ------
    method : {"rtn", "gptq", "ojbkq", "regcal"}
        ``"rtn"``: round to nearest (ignores ``H``). ``"gptq"``: box Babai
        (:func:`bils.babai`) on ``H`` — exactly GPTQ's loop. ``"ojbkq"``: joint target
        :math:`W_\mu` + Klein paths + K-best, the least-cost point per output row.
        ``"regcal"``: regularised target :math:`W_\alpha` + successive rounding
        (Babai), optionally as a beam over the full alphabet.
    ordering : str
        Column ordering (one of :data:`ORDERINGS`); default ``"diag"`` = act-order.
    damp : float >= 0
        Damping: ``damp * mean(diag H)`` added to the diagonal (GPTQ's ``percdamp``).
    block_size : int >= 1
        Lazy-batch block of the nearest-plane sweep (results do not depend on it).

    OJBKQ
    -----
    mu : float in [0, 1]
        Target mix :math:`\mu` (the α of :func:`bils.joint_target`): 0 = GPTQ's target,
        1 = GPTAQ's. Default 0.25, RegCal's fixed α (OJBKQ publishes no value; not
        tuned here: an SmolLM µ sweep did not fit the CPU budget, see docs/results.md).
    lam : float >= 0
        Ridge: ``lam * mean(diag H)`` added to the diagonal on top of ``damp``.
    n_samples : int >= 0
        Klein paths per row (the Babai path is always a candidate too).
    tau : "auto" or float >= 0
        Klein temperature (see :func:`bils.klein`).
    beam_width : int >= 0 or None
        K-best survivors per row. ``None``: 4 for ojbkq, 1 for regcal. ``0`` or ``1``
        means no beam (ojbkq: Klein only; regcal: plain successive rounding = Babai).
        regcal's beam expands each survivor over the full alphabet (``2**bits``
        children), as the authors' script does with ``beam_width=6``.

    RegCal
    ------
    alpha : float in [0, 1], "sample" or "closed_form"
        Fixed α (default 0.25); ``"sample"``: one α per calibration sequence from
        Beta(``beta_m``, ``beta_m``) folded to ``min(α, 1-α)``, folded into ``D`` by the
        calibration (then ``quantize_weight`` uses ``W_1`` with that ``D``);
        ``"closed_form"``: quantize at ``alpha0``, take :func:`bils.alpha_closed_form`
        of the result, re-quantize at that α.
    alpha0 : float in [0, 1]
        First-pass α of ``"closed_form"``.
    beta_m : float > 0
        Beta parameter of ``"sample"``.
    """

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: str = "minmax"
    method: str = "gptq"
    ordering: str = "diag"
    damp: float = 0.01
    block_size: int = 128
    # OJBKQ
    mu: float = 0.25
    lam: float = 0.0
    n_samples: int = 5
    tau: float | str = "auto"
    beam_width: int | None = None
    # RegCal
    alpha: float | str = 0.25
    alpha0: float = 0.25
    beta_m: float = 5.0

    def __post_init__(self):
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"`bits` must be an int in [2, 8], got {self.bits!r}")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 1):
            raise ValueError(f"`group_size` must be -1 (per-channel) or a positive int, got {self.group_size!r}")
        if not isinstance(self.sym, bool):
            raise ValueError(f"`sym` must be a bool, got {self.sym!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"`clip` must be one of {CLIPS}, got {self.clip!r}")
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"`ordering` must be one of {ORDERINGS}, got {self.ordering!r}")
        if not _is_real(self.damp) or self.damp < 0:
            raise ValueError(f"`damp` must be a finite float >= 0, got {self.damp!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"`block_size` must be a positive int, got {self.block_size!r}")
        for name in ("mu", "alpha0"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v <= 1:
                raise ValueError(f"`{name}` must be a float in [0, 1], got {v!r}")
        if not _is_real(self.lam) or self.lam < 0:
            raise ValueError(f"`lam` must be a finite float >= 0, got {self.lam!r}")
        if not _is_int(self.n_samples) or self.n_samples < 0:
            raise ValueError(f"`n_samples` must be an int >= 0, got {self.n_samples!r}")
        if not (self.tau == "auto" or (_is_real(self.tau) and self.tau >= 0)):
            raise ValueError(f"`tau` must be 'auto' or a float >= 0, got {self.tau!r}")
        if self.beam_width is not None and (not _is_int(self.beam_width) or self.beam_width < 0):
            raise ValueError(f"`beam_width` must be None or an int >= 0, got {self.beam_width!r}")
        if isinstance(self.alpha, str):
            if self.alpha not in _REGCAL_ALPHAS:
                raise ValueError(f"`alpha` must be a float in [0, 1], 'sample' or 'closed_form', got {self.alpha!r}")
        elif not _is_real(self.alpha) or not 0 <= self.alpha <= 1:
            raise ValueError(f"`alpha` must be a float in [0, 1], 'sample' or 'closed_form', got {self.alpha!r}")
        if not _is_real(self.beta_m) or self.beta_m <= 0:
            raise ValueError(f"`beta_m` must be a finite float > 0, got {self.beta_m!r}")

    # ------------------------------------------------------------------ derived
    @property
    def maxq(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def joint(self) -> bool:
        """Whether the method uses ``D`` (full-precision inputs) at all."""
        if self.method == "ojbkq":
            return self.mu > 0
        if self.method == "regcal":
            return self.alpha != 0
        return False

    @property
    def beam(self) -> int:
        """Effective beam width (``beam_width`` with the method's default)."""
        if self.beam_width is not None:
            return max(1, self.beam_width)
        return 4 if self.method == "ojbkq" else 1

    def n_groups(self, in_features: int) -> int:
        """Groups per row for a layer with ``in_features`` columns (last may be partial)."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def to_dict(self) -> dict:
        """Plain ``dict`` of the fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)

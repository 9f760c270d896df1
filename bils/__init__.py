"""bils — box-constrained integer least squares with many right-hand sides.

Solvers share one signature ``solver(R, Y, lo, hi, /, *, scale=None, offset=None, ...,
backend="auto")`` (or ``solver(problem, ...)``) and return one :class:`BILSResult`.
Importing :mod:`bils` never imports numba, cupy or torch.
"""

from ._backend import resolve_backend
from ._grid import GroupedGrid
from .babai import babai
from .enumeration import enumerate  # noqa: A004 - bils.enumerate is the exact solver
from .kbest import kbest
from .klein import klein
from . import lattice
from .lattice import Codebook, LatticeFit, fit_generator
from .ordering import column_order
from .problem import BILSProblem
from .targets import JointStats, alpha_closed_form, joint_target
from .result import STATUS_MESSAGES, BILSResult, Status

__all__ = [
    "BILSProblem",
    "BILSResult",
    "Codebook",
    "GroupedGrid",
    "LatticeFit",
    "STATUS_MESSAGES",
    "JointStats",
    "Status",
    "alpha_closed_form",
    "joint_target",
    "babai",
    "column_order",
    "enumerate",
    "fit_generator",
    "kbest",
    "klein",
    "lattice",
    "resolve_backend",
]
__version__ = "0.1.0"

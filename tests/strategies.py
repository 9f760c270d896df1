"""Hypothesis strategies for the test-suite: a thin re-export of :mod:`bils.testing.strategies`.

The strategies are public API (users verify their own solvers with them); the tests use
the very same ones, so there is one copy.
"""

from bils.testing.strategies import *  # noqa: F401,F403 - re-export
from bils.testing.strategies import __all__  # noqa: F401

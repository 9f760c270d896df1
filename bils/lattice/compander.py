r"""µ-law compander of a lattice codebook: :func:`compand` and its inverse :func:`expand`."""

from __future__ import annotations

import math

import numpy as np

from .._validate import float_iv

__all__ = ["compand", "expand"]


def compand(x, mu, amax):
    r"""µ-law compressor :math:`F(x) = a\,\mathrm{sign}(x)\,\ln(1 + \mu|x|/a)/\ln(1+\mu)`.

    Maps :math:`[-a, a]` onto itself, stretching small magnitudes (where weights are
    dense) and compressing large ones; :func:`expand` is its inverse.

    Parameters
    ----------
    x : array_like
    mu : float > 0
        Compression strength (GLVQ keeps it in [10, 255]).
    amax : float > 0
        Range :math:`a` (e.g. the largest magnitude of the group).

    Examples
    --------
    >>> import numpy as np
    >>> from bils.lattice import compand, expand
    >>> x = np.array([-1.0, -0.01, 0.0, 0.3, 1.0])
    >>> y = compand(x, 50.0, 1.0)
    >>> np.round(y, 3).tolist()
    [-1.0, -0.103, 0.0, 0.705, 1.0]
    >>> bool(np.allclose(expand(y, 50.0, 1.0), x))
    True
    """
    mu, amax = check_mu(mu, amax)
    x = np.asarray(x, dtype=np.float64)
    return amax * np.sign(x) * np.log1p(mu * np.abs(x) / amax) / math.log1p(mu)


def expand(y, mu, amax):
    r"""µ-law expander :math:`F^{-1}(y) = a\,\mathrm{sign}(y)\,((1+\mu)^{|y|/a} - 1)/\mu`.

    The inverse of :func:`compand` (same parameters).
    """
    mu, amax = check_mu(mu, amax)
    y = np.asarray(y, dtype=np.float64)
    return amax * np.sign(y) * np.expm1(np.abs(y) / amax * math.log1p(mu)) / mu


def check_mu(mu, amax):
    """Validated ``(mu, amax)``: both finite floats > 0 (errors name the argument)."""
    mu = float_iv("mu", mu, positive=True)
    amax = float_iv("amax", amax, positive=True)
    return mu, amax


r"""Lattice vector quantization: encode onto a generator, decode, fit the generator.

A :class:`Codebook` is a generator :math:`G \in \mathbb{R}^{d\times d}` with a box of
:math:`2^b` integers per dimension and a code offset :math:`o`: the reproduction points are

.. math::

    \hat v = G\,(z + o), \qquad z \in \mathbb{Z}^d,\; lo \le z \le hi,

optionally through a µ-law compander (:func:`expand` applied to :math:`G(z+o)`).
A vector of length :math:`n = m d` is :math:`m` consecutive sub-vectors sharing
:math:`G`. Encoding under a metric :math:`M = C^T C` (SPD, e.g. a block of a layer
Hessian) is a small box-constrained integer least-squares problem

.. math::

    \min_{z} (v - \hat v)^T M (v - \hat v)
    = \lVert C v - C (I_m \otimes G)(z + o) \rVert_2^2,

whose basis :math:`C (I_m \otimes G)` is block upper triangular; one QR per diagonal block
makes it upper triangular, and the solvers of :mod:`bils` apply unchanged (GLVQ; Babai
1986; Schnorr–Euchner 1994).

Modules: :mod:`~bils.lattice.codebook` (:class:`Codebook`, :func:`default_box`),
:mod:`~bils.lattice.compander` (µ-law), :mod:`~bils.lattice.encode` (:func:`encode`,
:func:`decode`), :mod:`~bils.lattice.fit` (:func:`fit_generator`). Every public name is
importable from ``bils.lattice``.
"""

from .codebook import Codebook, default_box
from .compander import compand, expand
from .encode import ENCODE_METHODS, decode, encode
from .fit import LatticeFit, fit_generator

__all__ = ["Codebook", "LatticeFit", "ENCODE_METHODS", "encode", "decode", "fit_generator",
           "compand", "expand", "default_box"]

"""Codes that must not move when the calibration or the solve path is made faster (issue #18).

The digests below were made with the code before the speed work of issue #18's e2e7 branch
(commit 0a66193): gptq through :func:`~llm_adapter.calibration.quantize_model` on the tiny
Llama (single pass and capture passes, the numba and numpy backends: every path gives the same
codes and the same dequantized weights), and one ``quantize_weight`` layer with more than 256
inputs (the tiles of the symmetry check, the permuted copy of ``H`` and the triangular product
of the diagnostics cross tile boundaries there).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_adapter import QuantSpec, quantize_model, quantize_weight  # noqa: E402
from tests.llm_fixtures import tiny_llama  # noqa: E402

#: sha256[:16] of (name, codes, scales) of every layer, and of the model's parameters after.
DRIVER_CODES = "2087e32fbbe5a8d3"
DRIVER_WEIGHTS = "dc83fa2a080d68a1"
#: sha256[:16] of codes, scales and perm of the 300-input layer, per backend.
LAYER = {"numba": "d091014cfcfe7cdb", "numpy": "d091014cfcfe7cdb"}


def _backends():
    from bils._backend import numba_available

    return ["numpy"] + (["numba"] if numba_available() else [])


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("backend", _backends())
def test_driver_codes_unchanged(backend, single_pass):
    model = tiny_llama(seed=0, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)
    windows = torch.randint(0, 200, (8, 24), generator=torch.Generator().manual_seed(1))
    layers = quantize_model(model, windows, QuantSpec(bits=3, group_size=32, method="gptq"), backend=backend,
                            progress=False, seed=0, batch_size=3, single_pass=single_pass)
    h = hashlib.sha256()
    for name, q in layers.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(q.codes).tobytes())
        h.update(np.ascontiguousarray(q.scales).tobytes())
    assert h.hexdigest()[:16] == DRIVER_CODES
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    assert weights.hexdigest()[:16] == DRIVER_WEIGHTS


def _layer():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 900)) * rng.lognormal(0, 0.7, (300, 1))
    return rng.standard_normal((40, 300)) * 0.02, X @ X.T / 900


@pytest.mark.parametrize("backend", _backends())
def test_layer_codes_unchanged(backend):
    W, H = _layer()
    q = quantize_weight(W, H, None, QuantSpec(bits=3, group_size=128, method="gptq"), backend=backend)
    assert hashlib.sha256(q.codes.tobytes() + q.scales.tobytes() + q.perm.tobytes()).hexdigest()[:16] == LAYER[backend]


def test_layer_diagnostics_match_the_dense_products():
    """The diagnostics from the factor (``E`` by a triangular product) against their definitions."""
    W, H = _layer()
    spec = QuantSpec(bits=3, group_size=128, method="gptq")
    q = quantize_weight(W, H, None, spec, backend="numpy")
    from llm_adapter.methods._shared import damped_hessian

    Hd = damped_hessian(H, spec.damp)[0]
    E = W - q.dequantize(np.float64)
    ref = float(np.sum((W @ Hd) * W))
    np.testing.assert_allclose(q.stats["loss"], float(np.sum((E @ Hd) * E)), rtol=1e-9)
    np.testing.assert_allclose(q.stats["rel_loss"], q.stats["loss"] / ref, rtol=1e-9)

"""The one atomic writer (formats._io) and the pure statistics of calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from llm_adapter.calibration.statistics import LayerStatistics  # noqa: E402
from llm_adapter.formats._io import jsonable, write_dir_atomically, write_file_atomically  # noqa: E402


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old" in p.name)


def test_write_file_replaces_and_cleans_up_on_failure(tmp_path):
    p = tmp_path / "a.bin"
    write_file_atomically(p, lambda f: f.write(b"one"))
    write_file_atomically(p, lambda f: f.write(b"two"))
    assert p.read_bytes() == b"two"

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_file_atomically(p, boom)
    assert p.read_bytes() == b"two" and _leftovers(tmp_path) == []


def test_write_dir_on_exists(tmp_path):
    target = tmp_path / "d"

    def fill(text):
        return lambda d: (d / "x").write_text(text)

    write_dir_atomically(target, fill("1"))
    with pytest.raises(FileExistsError):
        write_dir_atomically(target, fill("2"))
    write_dir_atomically(target, fill("3"), on_exists="keep")
    assert (target / "x").read_text() == "1"
    write_dir_atomically(target, fill("4"), on_exists="replace")
    assert (target / "x").read_text() == "4"
    with pytest.raises(ValueError, match="on_exists"):
        write_dir_atomically(target, fill("5"), on_exists="sometimes")

    def boom(d):
        (d / "x").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, boom, on_exists="replace")
    assert (target / "x").read_text() == "4" and _leftovers(tmp_path) == []


def test_jsonable_is_strict_json():
    obj = {"nan": float("nan"), "inf": float("inf"), "a": np.arange(3, dtype=np.int8), "t": (np.float16(0.5),)}
    text = json.dumps(jsonable(obj), allow_nan=False)
    assert json.loads(text) == {"nan": None, "inf": "inf", "a": [0, 1, 2], "t": [0.5]}


@given(seed=st.integers(0, 2**31), n_seq=st.integers(1, 6), tokens=st.integers(1, 5), n=st.integers(1, 6),
       split=st.integers(1, 6), sample=st.booleans())
def test_statistics_do_not_depend_on_batching(seed, n_seq, tokens, n, split, sample):
    """Sums over batches equal the one-shot sums H = X̃ᵀX̃, D = (diag(α) (X − X̃))ᵀ X̃ (rows per token)."""
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(n_seq, tokens, n, generator=g)
    xf = xq + 0.1 * torch.randn(n_seq, tokens, n, generator=g)
    alphas = torch.rand(n_seq, generator=g) if sample else None
    acc = LayerStatistics(n, joint=True, alphas=alphas)
    for s in range(0, n_seq, split):
        acc.add(xq[s:s + split], xf[s:s + split], seq=s)
    H, D = acc.mean(n_seq * tokens)
    X = xq.reshape(-1, n).double().numpy()
    dX = (xf - xq).reshape(-1, n).double().numpy()
    if sample:
        dX = dX * np.repeat(alphas.double().numpy(), tokens)[:, None]
    np.testing.assert_allclose(H, X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D, dX.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    assert LayerStatistics(n, joint=False).mean(1)[1] is None


@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_syrk_gram_matches_the_float64_product_and_the_float32_matmul(n):
    """H by BLAS ssyrk (the upper triangle, mirrored) against the float64 oracle and the full
    float32 product: the same to float32 rounding, exactly symmetric; D untouched by `gram`."""
    from llm_adapter.calibration.statistics import gram_update

    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(2, 33, n, generator=g) * (1 + 10 * torch.rand(n, generator=g)) for _ in range(3)]
    xf = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    got = {}
    for gram in ("syrk", "matmul", "auto"):
        st_ = LayerStatistics(n, joint=True, gram=gram)
        for i, (x, f) in enumerate(zip(xs, xf)):
            st_.add(x, f, seq=2 * i)
        got[gram] = st_.mean(198)
    X = torch.cat([x.reshape(-1, n) for x in xs]).double()
    dX = torch.cat([(f - x).reshape(-1, n) for x, f in zip(xs, xf)]).double()
    ref_H, ref_D = (X.T @ X / 198).numpy(), (dX.T @ X / 198).numpy()
    scale = np.abs(ref_H).max()
    for gram in ("syrk", "matmul"):
        H, D = got[gram]
        assert np.abs(H - ref_H).max() <= 1e-6 * scale
    np.testing.assert_array_equal(got["syrk"][0], got["syrk"][0].T)  # the full product is only nearly so
    np.testing.assert_array_equal(got["auto"][0], got["syrk"][0])  # the default on the CPU
    np.testing.assert_array_equal(got["syrk"][1], got["matmul"][1])
    np.testing.assert_allclose(got["syrk"][1], ref_D, rtol=1e-4, atol=1e-6 * np.abs(ref_D).max())
    tri = gram_update(xs[0].reshape(-1, n), np.zeros((n, n), np.float32, order="F")).numpy()
    np.testing.assert_array_equal(np.tril(tri, -1), 0)


def test_gram_option_is_checked():
    with pytest.raises(ValueError, match="`gram` must be one of"):
        LayerStatistics(4, joint=False, gram="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`gram`='syrk' needs the sums on the CPU"):
            LayerStatistics(4, joint=False, gram="syrk", device="meta")

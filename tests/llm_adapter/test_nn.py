"""Packing (GPTQ bit layout) and the QuantLinear inference module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llm_adapter.formats.packing import pack, packed_length, period, unpack
from llm_adapter.nn import QuantLinear, quant_matmul, replace_linear, unpack_torch
from llm_adapter.methods.uniform import QuantizedLayer


def random_layer(rng, out_f, in_f, bits, group_size, *, act_order=False, bias=True, zero_range=None):
    """A QuantizedLayer with random codes, positive scales and integer zeros."""
    gs = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // gs)
    if act_order:  # GPTQ without static groups: groups follow the decision order
        perm = rng.permutation(in_f)
        g_idx = np.empty(in_f, np.int32)
        g_idx[perm] = np.arange(in_f) // gs
    else:
        perm = None
        g_idx = (np.arange(in_f) // gs).astype(np.int32)
    lo, hi = zero_range if zero_range is not None else (0, (1 << bits) - 1)
    return QuantizedLayer(
        codes=rng.integers(0, 1 << bits, (out_f, in_f)).astype(np.uint8),
        scales=rng.uniform(1e-3, 0.2, (out_f, n_groups)).astype(np.float32),
        zeros=rng.integers(lo, hi + 1, (out_f, n_groups)).astype(np.float32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        perm=perm,
        bias=rng.standard_normal(out_f).astype(np.float32) if bias else None,
        stats={"loss": float(rng.uniform()), "rel_loss": 0.01, "babai_bound": None, "clipped_frac": 0.0, "time": 0.1},
    )


def fp16_scales(layer: QuantizedLayer) -> QuantizedLayer:
    """The same layer with scales rounded to float16 (what QuantLinear / GPTQ store)."""
    return QuantizedLayer(**{**layer.__dict__, "scales": layer.scales.astype(np.float16).astype(np.float32)})


# --------------------------------------------------------------------------- packing


def _autogptq_pack_3bit(intweight):
    """AutoGPTQ's published 3-bit ``pack`` loop (rows of `intweight` are packed), as an oracle."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * 3, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qweight.view(np.int32)


def _autogptq_pack_pow2(intweight, bits):
    intweight = intweight.astype(np.uint32)
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << (bits * j)
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_loop(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, (96, 5))
    oracle = _autogptq_pack_3bit(v) if bits == 3 else _autogptq_pack_pow2(v, bits)
    np.testing.assert_array_equal(pack(v, bits, axis=0), oracle)


def test_pack_known_words():
    assert pack(np.arange(8), 4).view(np.uint32)[0] == 0x76543210
    # 3 bits: value 10 straddles words 0/1 (bits 30-31 | bit 0), value 21 words 1/2 (bit 31 | bits 0-1)
    v = np.zeros(32, np.int64)
    v[10] = 0b111
    np.testing.assert_array_equal(pack(v, 3).view(np.uint32), [0xC0000000, 0x1, 0x0])
    v[:] = 0
    v[21] = 0b101
    np.testing.assert_array_equal(pack(v, 3).view(np.uint32), [0x0, 0x80000000, 0x2])


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    n=st.integers(0, 80),
    other=st.integers(1, 4),
    axis=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(bits, n, other, axis, seed):
    rng = np.random.default_rng(seed)
    shape = (n, other) if axis == 0 else (other, n)
    v = rng.integers(0, 1 << bits, shape).astype(np.uint8)
    words = pack(v, bits, axis=axis)
    assert words.dtype == np.int32
    assert words.shape[axis] == packed_length(n, bits)
    np.testing.assert_array_equal(unpack(words, bits, n, axis=axis), v)
    if axis == 0:
        np.testing.assert_array_equal(unpack_torch(torch.from_numpy(words), bits, n).numpy(), v)


def test_packed_length_is_exact_for_whole_periods():
    for bits in (2, 3, 4, 8):
        values, words = period(bits)
        assert packed_length(4 * values, bits) == 4 * values * bits // 32 == 4 * words


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pack([0, 1, 8], 3), r"`values` must lie in \[0, 7\]"),
        (lambda: pack([0.5], 4), "`values` must be integers"),
        (lambda: pack([1], 5), "`bits` must be one of"),
        (lambda: pack([[1]], 4, axis=2), "`axis` must be an int"),
        (lambda: unpack(np.zeros(2, np.int32), 3, 32), "need 3"),
        (lambda: unpack(np.zeros(3, np.int64), 3, 32), "`words` must be int32"),
    ],
)
def test_packing_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("out_f, in_f, batch", [(7, 77, (3,)), (64, 128, (2, 5)), (1, 256, (1, 1, 3)), (33, 200, ())])
def test_quant_linear_matches_dequantized_matmul(bits, group_size, out_f, in_f, batch):
    rng = np.random.default_rng([bits, group_size + 1, out_f, in_f])
    layer = random_layer(rng, out_f, in_f, bits, group_size, act_order=out_f == 64)
    m = QuantLinear.from_quantized(layer)
    w = torch.from_numpy(fp16_scales(layer).dequantize())
    np.testing.assert_array_equal(m.dequantize().numpy(), w.numpy())
    x = torch.from_numpy(rng.standard_normal((*batch, in_f)).astype(np.float32))
    expected = x @ w.T + torch.from_numpy(layer.bias)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(x), expected)  # cached weight
    torch.testing.assert_close(
        quant_matmul(x, m.qweight, m.scales, m.zeros, m.g_idx, m.bias, bits, group_size, in_f), expected
    )


def test_quant_linear_stores_gptq_orientation_and_drops_static_g_idx():
    rng = np.random.default_rng(0)
    static = QuantLinear.from_quantized(random_layer(rng, 16, 64, 3, 32))
    assert static.qweight.shape == (6, 16) and static.qweight.dtype == torch.int32
    assert static.scales.shape == (2, 16) and static.scales.dtype == torch.float16
    assert static.zeros.dtype == torch.float16
    assert static.g_idx is None
    dynamic = QuantLinear.from_quantized(random_layer(rng, 16, 64, 3, 32, act_order=True))
    assert dynamic.g_idx is not None and dynamic.g_idx.dtype == torch.int32
    assert set(dict(dynamic.named_buffers())) == {"qweight", "scales", "zeros", "g_idx", "bias"}


def test_quant_linear_cache_follows_dtype_and_state_dict():
    rng = np.random.default_rng(1)
    layer = random_layer(rng, 8, 64, 4, 32, bias=False)
    m = QuantLinear.from_quantized(layer)
    x = torch.randn(2, 64, dtype=torch.float64)
    w = torch.from_numpy(fp16_scales(layer).dequantize()).double()
    torch.testing.assert_close(m(x), x @ w.T)
    other = QuantLinear.from_quantized(random_layer(rng, 8, 64, 4, 32, bias=False))
    m(x.float())
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m(x.float()), other(x.float()))


def test_quant_matmul_opcheck():
    rng = np.random.default_rng(2)
    m = QuantLinear.from_quantized(random_layer(rng, 8, 64, 3, 32, act_order=True))
    x = torch.randn(3, 64)
    torch.library.opcheck(quant_matmul, (x, m.qweight, m.scales, m.zeros, m.g_idx, m.bias, 3, 32, 64))


def _qargs(in_f=64, out_f=8, bits=4, group_size=32):
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    return dict(
        bits=bits,
        group_size=group_size,
        qweight=torch.zeros(packed_length(in_f, bits), out_f, dtype=torch.int32),
        scales=torch.ones(n_groups, out_f),
        zeros=torch.zeros(n_groups, out_f),
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(bits=5), "`bits` must be one of"),
        (dict(group_size=16), "`group_size` must be one of"),
        (dict(qweight=torch.zeros(3, 8, dtype=torch.int32)), r"`qweight` must be an int32 tensor of shape \(8, 8\)"),
        (dict(qweight=torch.zeros(8, 8, dtype=torch.int64)), "`qweight` must be an int32"),
        (dict(scales=torch.ones(3, 8)), r"`scales` must be a float tensor of shape \(n_groups, out_features\) = \(2, 8\)"),
        (dict(scales=torch.zeros(2, 8)), "`scales` must be finite and positive"),
        (dict(zeros=torch.full((2, 8), 16.0)), r"`zeros` must be finite and lie in \[0, 15\]"),
        (dict(g_idx=torch.full((64,), 2, dtype=torch.int32)), r"`g_idx` must lie in \[0, 1\]"),
        (dict(g_idx=torch.zeros(63, dtype=torch.int32)), r"`g_idx` must be an integer tensor of shape \(64,\)"),
        (dict(bias=torch.zeros(7)), r"`bias` must be a float tensor of shape \(8,\)"),
    ],
)
def test_quant_linear_constructor_errors(change, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear(64, 8, **{**_qargs(), **change})


def test_quant_linear_rejects_bad_input_width():
    m = QuantLinear(64, 8, **_qargs())
    with pytest.raises(ValueError, match="expects 64"):
        m(torch.zeros(2, 63))


def test_replace_linear_on_tiny_llama():
    from tests.llm_fixtures import tiny_llama

    model, reference = tiny_llama(), tiny_llama()
    rng = np.random.default_rng(3)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            out_f, in_f = mod.weight.shape
            layers[name] = random_layer(rng, out_f, in_f, 3, 32, act_order="mlp" in name, bias=False)
    with torch.no_grad():
        for name, layer in layers.items():
            reference.get_submodule(name).weight.copy_(torch.from_numpy(fp16_scales(layer).dequantize()))
    replace_linear(model, layers)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), QuantLinear)
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_replace_linear_errors():
    from tests.llm_fixtures import tiny_llama

    model = tiny_llama()
    rng = np.random.default_rng(4)
    layer = random_layer(rng, 64, 64, 4, 32)
    with pytest.raises(KeyError, match="does not have"):
        replace_linear(model, {"model.layers.0.self_attn.nope": layer})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        replace_linear(model, {"model.layers.0.input_layernorm": layer})
    with pytest.raises(ValueError, match="weight shape"):
        replace_linear(model, {"model.layers.0.mlp.up_proj": layer})
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)

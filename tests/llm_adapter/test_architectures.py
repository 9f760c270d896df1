"""The architecture matrix: every supported family, on tiny random models built from
transformers configs (nothing is downloaded), quantizes, saves, loads, evaluates and
generates; at 8 bits the logits stay close to the float model's.

Tolerance (8 bits, per-channel, gptq): ``||z_q - z||_F <= 0.03 ||z||_F`` over the logits ``z``
of the calibration windows (measured 0.001-0.014 over the families; the largest, Qwen2-MoE,
where a few tokens change experts, see docs/architectures.md).

Cost: every family with gptq at 8 bits (the save/load/evaluate/generate round trip), rtn at
4 bits (packed :class:`~llm_adapter.nn.QuantLinear` modules) and the GPTQ export; every
registered method on Llama, GPT-2 and Mixtral only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_adapter import QuantSpec, evaluation_windows, perplexity
from llm_adapter.cli.common import load_quantized_model
from llm_adapter.calibration import InlineSolver, find_blocks, quantize_model, select_linears
from llm_adapter.formats import load_quantized, save_quantized
from llm_adapter.methods.glvq import GLVQSpec
from llm_adapter.nn import QuantLinear, replace_linear
from tests.llm_fixtures import BOS_ID, EOS_ID, TINY_VOCAB, tiny_tokenizer

NUMPY = "numpy"
TOL_8BIT = 0.03


def _configs():
    import transformers as T

    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, tie_word_embeddings=False)
    gqa = dict(num_key_value_heads=2, intermediate_size=64)
    return {
        "llama": lambda: T.LlamaConfig(**common, **gqa),
        "mistral": lambda: T.MistralConfig(**common, **gqa, sliding_window=8),
        "qwen2": lambda: T.Qwen2Config(**common, **gqa),
        "qwen3": lambda: T.Qwen3Config(**common, **gqa, head_dim=8),
        "gemma2": lambda: T.Gemma2Config(**common, **gqa, head_dim=8, sliding_window=8),
        "gemma3": lambda: T.Gemma3TextConfig(**common, **gqa, head_dim=8, sliding_window=8),
        "phi3": lambda: T.Phi3Config(**common, **gqa),
        "opt": lambda: T.OPTConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=64, word_embed_proj_dim=32, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                   pad_token_id=EOS_ID),
        "gpt2": lambda: T.GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS_ID,
                                     eos_token_id=EOS_ID),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common, intermediate_size=64),
        "falcon": lambda: T.FalconConfig(**common),
        "mixtral": lambda: T.MixtralConfig(**common, **gqa, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, **gqa, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, **gqa, moe_intermediate_size=16, num_experts=4,
                                              num_experts_per_tok=2, head_dim=8),
    }


FAMILIES = tuple(_configs())
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_model(family: str, seed: int = 0):
    """A tiny random causal LM of `family` (float32, eval mode, deterministic in `seed`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[family]())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough for logits far from uniform
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 and ("norm" in name or "ln" in name) else 0.1 * noise)
    return model.eval()


def _windows(n=4, T=16, seed=0):
    w = torch.randint(2, TINY_VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
    w[:, 0] = BOS_ID
    return w


def _expected_names(model):
    """Every weight a full selection must quantize: Linear/Conv1D modules and fused experts."""
    sel = select_linears(model)
    out = set()
    for layers in sel.values():
        for name, layer in layers.items():
            if hasattr(layer, "n_experts"):
                out.update(f"{name}.{e}" for e in range(layer.n_experts))
            else:
                out.add(name)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_8bit_round_trip(family, tmp_path):
    """gptq at 8 bits: quantize, save, load onto a fresh model, evaluate, generate; logits close."""
    model = tiny_model(family)
    win = _windows()
    with torch.no_grad():
        ref = model(input_ids=win, use_cache=False).logits
    blocks_name, blocks = find_blocks(model)
    assert len(blocks) == 2
    layers = quantize_model(model, win, QuantSpec(bits=8, group_size=-1, method="gptq"), backend=NUMPY,
                            progress=False)
    assert set(layers) == _expected_names(model)
    if family in MOE:
        assert any(".experts.gate_up_proj." in n for n in layers) and any(".experts.down_proj." in n for n in layers)
    with torch.no_grad():
        got = model(input_ids=win, use_cache=False).logits
    err = float((got - ref).norm() / ref.norm())
    assert err < TOL_8BIT, (family, err)

    base = tmp_path / "base"
    tiny_model(family).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    path = save_quantized(tmp_path / "q", layers, {"method": "gptq", "bits": 8},
                          {"source": str(base), "config": model.config.to_dict()})
    fresh, _, _ = load_quantized_model(path)  # what `evaluate/generate --quantized` load
    with torch.no_grad():
        again = fresh(input_ids=win, use_cache=False).logits
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-5)
    ev = evaluation_windows(tiny_tokenizer(), "the quick brown fox jumps over the lazy dog " * 8, n_windows=2,
                            seqlen=16)
    ppl = perplexity(fresh, ev, progress=False).ppl
    assert np.isfinite(ppl) and ppl > 1
    out = fresh.generate(win[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=EOS_ID)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_4bit_packed_modules(family):
    """rtn at 4 bits, group 32: Linear/Conv1D layers become packed QuantLinear modules that
    give the dequantized model's logits; fused experts are written dequantized."""
    model = tiny_model(family)
    win = _windows(n=2)
    layers = quantize_model(model, win, QuantSpec(bits=4, group_size=32, method="rtn"), progress=False)
    with torch.no_grad():
        want = model(input_ids=win, use_cache=False).logits
    fresh = tiny_model(family)
    replace_linear(fresh, layers)
    n_packed = sum(isinstance(m, QuantLinear) for m in fresh.modules())
    assert n_packed == sum(1 for n in layers if ".experts." not in n or "shared_expert" in n)
    with torch.no_grad():
        got = fresh(input_ids=win, use_cache=False).logits
    assert float((got - want).norm() / want.norm()) < 1e-3  # fp16 scales of the packed modules
    assert fresh.generate(win[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=EOS_ID).shape == (1, 7)


SPECS = {
    "rtn": QuantSpec(bits=4, group_size=32, method="rtn"),
    "gptq": QuantSpec(bits=4, group_size=32, method="gptq"),
    "ojbkq": QuantSpec(bits=4, group_size=32, method="ojbkq", n_samples=2),
    "regcal": QuantSpec(bits=4, group_size=32, method="regcal", alpha="sample"),
    "glvq": GLVQSpec(bits=2, d=4, group_size=32, n_iter=2, encode="nearest_plane"),
}


@pytest.mark.parametrize("family", ("llama", "gpt2", "mixtral"))
@pytest.mark.parametrize("method", tuple(SPECS))
def test_every_method(family, method, tmp_path):
    model = tiny_model(family)
    win = _windows(n=2)
    layers = quantize_model(model, win, SPECS[method], backend=NUMPY, progress=False)
    assert set(layers) == _expected_names(model)
    with torch.no_grad():
        want = model(input_ids=win, use_cache=False).logits
    loaded, _ = load_quantized(save_quantized(tmp_path / "q", layers, SPECS[method].to_dict()))
    fresh = tiny_model(family)
    replace_linear(fresh, loaded)
    with torch.no_grad():
        got = fresh(input_ids=win, use_cache=False).logits
    assert float((got - want).norm() / want.norm()) < 1e-3  # fp16 scales of the packed modules


def test_conv1d_weight_is_transposed():
    """GPT-2's Conv1D: the quantized layer is the (out, in) transpose of its weight."""
    model = tiny_model("gpt2")
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out)
    layers = quantize_model(model, _windows(n=2), QuantSpec(bits=8, group_size=-1, method="rtn"), progress=False)
    q = layers["transformer.h.0.attn.c_attn"]
    assert q.shape == tuple(w.T.shape) == (96, 32)
    np.testing.assert_allclose(q.dequantize(), w.T.numpy(), atol=float(w.abs().max()) / 100)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, torch.from_numpy(q.dequantize()).T)


def test_groups_follow_the_data_flow():
    """Falcon's parallel attention: query_key_value and dense_h_to_4h read the same tensor."""
    from llm_adapter.calibration.blocks import first_block_inputs, layer_groups

    model = tiny_model("falcon")
    name, blocks = find_blocks(model)
    (h, rest, kw), = first_block_inputs(model, blocks, _windows(n=1), 1, "cpu")
    sel = select_linears(model)[0]
    groups = layer_groups(blocks[0], sel, (h, rest, kw))
    short = [[n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in g] for g in groups]
    assert short[0] == ["self_attention.query_key_value", "mlp.dense_h_to_4h"], short
    gpt2 = tiny_model("gpt2")
    _, b2 = find_blocks(gpt2)
    (h, rest, kw), = first_block_inputs(gpt2, b2, _windows(n=1), 1, "cpu")
    g2 = layer_groups(b2[0], select_linears(gpt2)[0], (h, rest, kw))
    assert [[n.rsplit(".", 1)[-1] for n in g] for g in g2] == [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]]


def test_find_blocks_does_not_guess():
    class NoBlocks(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(ValueError, match="0 ModuleLists have entries of a `_no_split_modules` class"):
        find_blocks(NoBlocks())

    class Blk(torch.nn.Linear):
        pass

    class TwoStacks(torch.nn.Module):  # e.g. an encoder and a decoder: the config's layer count decides
        _no_split_modules = ["Blk"]

        def __init__(self, n):
            super().__init__()
            self.config = type("Cfg", (), {"num_hidden_layers": n})()
            self.encoder = torch.nn.ModuleList([Blk(2, 2) for _ in range(2)])
            self.decoder = torch.nn.ModuleList([Blk(2, 2) for _ in range(3)])

    assert find_blocks(TwoStacks(3))[0] == "decoder"
    assert find_blocks(TwoStacks(2))[0] == "encoder"
    with pytest.raises(ValueError, match="2 ModuleLists have entries"):
        find_blocks(TwoStacks(5))


# --------------------------------------------------------------------------- MoE


def _route_to_first_two(model):
    """Patch every router so that only experts 0 and 1 are ever chosen (2 and 3 see no token)."""
    for mod in model.modules():
        if type(mod).__name__.endswith("TopKRouter"):
            orig = mod.forward

            def forward(h, _orig=orig):
                out = list(_orig(h))
                out[-1] = out[-1] % 2  # indices
                return tuple(out)

            mod.forward = forward


@pytest.mark.parametrize("family", MOE)
def test_moe_experts_with_zero_tokens(family, caplog):
    model = tiny_model(family)
    _route_to_first_two(model)
    router = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.gate.weight" in n}
    win = _windows()
    layers = quantize_model(model, win, QuantSpec(bits=4, group_size=-1, method="gptq"), backend=NUMPY,
                            progress=False)
    n_tok = win.numel()
    for b in range(2):
        for part in ("gate_up_proj", "down_proj"):
            st = [layers[f"model.layers.{b}.mlp.experts.{part}.{e}"].stats for e in range(4)]
            assert [s["tokens"] for s in st][2:] == [0, 0]
            assert [s["fallback"] for s in st] == [False, False, True, True]
            assert 0 < st[0]["tokens"] <= n_tok and st[0]["tokens"] + st[1]["tokens"] >= n_tok
            assert all(np.isfinite(s["rel_loss"]) for s in st)
    for n, p in model.named_parameters():  # the router stays float
        if n in router:
            assert torch.equal(p, router[n])


class _Recording(InlineSolver):
    def __init__(self):
        self.H = {}

    def submit(self, name, W, H, D, spec, **kw):
        self.H[name] = H
        return super().submit(name, W, H, D, spec, **kw)


@pytest.mark.parametrize("family", ("mixtral", "qwen2_moe"))
def test_moe_statistics_are_the_routed_tokens(family):
    """H of expert e = Gram of the hidden states routed to e (gate_up) and of e's own
    intermediate act(gate) * up with its quantized gate_up weight (down)."""
    model = tiny_model(family)
    win = _windows()
    seen = {}
    experts = model.model.layers[0].mlp.experts
    h = experts.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args))
    with torch.no_grad():
        model(input_ids=win, use_cache=False)
    h.remove()
    hidden, idx = seen["args"][0], seen["args"][1]
    rec = _Recording()
    layers = quantize_model(model, win, QuantSpec(bits=4, group_size=-1, method="gptq"), backend=NUMPY,
                            progress=False, targets=["mlp.experts.*"], solver=rec, batch_size=8,
                            min_expert_tokens=1)
    for e in range(4):
        rows = (idx == e).any(-1)
        x = hidden[rows].double()
        H = (x.T @ x / rows.sum()).numpy()
        np.testing.assert_allclose(rec.H[f"model.layers.0.mlp.experts.gate_up_proj.{e}"], H, rtol=1e-5, atol=1e-7)
        assert layers[f"model.layers.0.mlp.experts.gate_up_proj.{e}"].stats["tokens"] == int(rows.sum())
        with torch.no_grad():
            gate, up = torch.nn.functional.linear(hidden[rows], experts.gate_up_proj[e]).chunk(2, -1)
            z = (experts.act_fn(gate) * up).double()
        np.testing.assert_allclose(rec.H[f"model.layers.0.mlp.experts.down_proj.{e}"], (z.T @ z / rows.sum()).numpy(),
                                   rtol=1e-4, atol=1e-7)


def test_unquantizable_weight_is_named_in_a_warning(caplog):
    model = tiny_model("llama")
    model.model.layers[0].mlp.extra = torch.nn.Module()
    model.model.layers[0].mlp.extra.table = torch.nn.Parameter(torch.zeros(3, 4))
    with caplog.at_level("WARNING", logger="llm_adapter.calibration"):
        select_linears(model)
    assert "model.layers.0.mlp.extra.table" in caplog.text


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe"])
def test_cli_quantize_prints_the_table_as_it_goes(tmp_path, capsys, text_file, family):
    """`quantize` on a saved tiny model: one table row per layer as it finishes (experts with
    their routed tokens), the table in the output's report, the exports, then `evaluate`."""
    import json

    from tests.llm_fixtures import run_cli

    base = tmp_path / "base"
    tiny_model(family).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    argv = ["quantize", "--model", base, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
            text_file, "--calib-windows", "4", "--seqlen", "32", "--backend", "numpy", "--out", tmp_path / "q"]
    if family == "gpt2":
        argv += ["--export-compressed-tensors", tmp_path / "ct", "--export-gptq", tmp_path / "gptq"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    header = out.splitlines()[1]
    for column in ("layer", "rel loss", "vs GPTQ", "clipped %", "alpha", "tokens", "time s"):
        assert column in header
    layers, meta = load_quantized(tmp_path / "q")
    report = meta["model"]["report"]
    assert len(report["rows"]) == len(layers) and report["columns"][3] == "vs GPTQ"
    if family == "qwen2_moe":
        row = next(r for r in report["rows"] if r[0] == "model.layers.0.mlp.experts.down_proj.0")
        assert int(row[7].rstrip("*")) == layers["model.layers.0.mlp.experts.down_proj.0"].stats["tokens"]
        assert "model.layers.1.mlp.experts.gate_up_proj.3" in out
    else:
        qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
        assert qc["format"] == "pack-quantized"
        assert (tmp_path / "gptq" / "model.safetensors").is_file()
    code, out, err = run_cli(capsys, "evaluate", "--quantized", tmp_path / "q", "--text", text_file,
                             "--windows", "2", "--seqlen", "32")
    assert code == 0, err


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_export_every_family(tmp_path, family):
    """The GPTQ checkpoint of every family, read back by the independent reader
    (tests/gptq_reader.py). MoE: the experts are written under save_pretrained's names
    (Mixtral: block_sparse_moe.experts.<e>.w1/w3/w2), each equal to the quantized model's
    weight there up to the fp16 scales."""
    from safetensors.torch import load_file

    from llm_adapter.formats import export_gptq
    from tests.gptq_reader import read_gptq
    from tests.llm_adapter.test_nn import fp16_scales

    model = tiny_model(family)
    layers = quantize_model(model, _windows(n=2), QuantSpec(bits=4, group_size=-1, method="gptq"), backend=NUMPY,
                            progress=False)
    out = export_gptq(model, layers, tmp_path / "gptq")
    config, weights, tensors = read_gptq(out)
    assert config["model_type"] == model.config.model_type
    if family not in MOE:
        assert set(weights) == set(layers)
        for name, layer in layers.items():
            np.testing.assert_array_equal(weights[name], fp16_scales(layer).dequantize(), err_msg=name)
        return
    model.save_pretrained(tmp_path / "ref")
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    packed = ("qweight", "qzeros", "scales", "g_idx")
    assert {f"{n}.weight" for n in weights} | {k for k in tensors if k.rsplit(".", 1)[-1] not in packed} == set(ref)
    for name, w in weights.items():
        want = ref[f"{name}.weight"].numpy()
        np.testing.assert_allclose(w, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=name)
    if family == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w1" in weights

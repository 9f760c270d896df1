"""Tiny, offline LLM pieces for tests: a random Llama and a byte-level tokenizer.

Import from tests as ``from tests.llm_fixtures import tiny_llama, tiny_tokenizer, save_tiny``
(``tests`` is a package). Nothing here downloads
anything, and nothing seeds a global RNG: weights are drawn from a local
``torch.Generator``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: Special tokens of :func:`tiny_tokenizer`, then the 256 byte-level symbols.
SPECIALS = ("<|endoftext|>", "<s>")
EOS_ID, BOS_ID = 0, 1
TINY_VOCAB = len(SPECIALS) + 256


def tiny_tokenizer():
    """Byte-level tokenizer with no merges: every byte is one token.

    Ids: ``0`` = ``<|endoftext|>`` (EOS), ``1`` = ``<s>`` (BOS), then the 256 byte symbols.
    With ``add_special_tokens=True`` it prepends BOS (so a caller that forgets
    ``add_special_tokens=False`` gets a visible extra BOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_llama(
    seed: int = 0,
    vocab: int = TINY_VOCAB,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    std: float = 0.1,
):
    """A small random ``LlamaForCausalLM`` in eval mode, float32, deterministic in `seed`.

    Linear and embedding weights are ``N(0, std^2)``, norm weights ``1 + N(0, 0.1^2)``,
    all drawn from ``torch.Generator().manual_seed(seed)``. ``std=0.1`` (larger than
    the usual 0.02) gives logits far from uniform, so perplexities differ between models.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return model.eval()


def save_tiny(directory: str | os.PathLike, model=None, tokenizer=None) -> Path:
    """Save a tiny model and tokenizer with ``save_pretrained`` into `directory`."""
    directory = Path(directory)
    (model if model is not None else tiny_llama()).save_pretrained(directory)
    (tokenizer if tokenizer is not None else tiny_tokenizer()).save_pretrained(directory)
    return directory


def _llama_cpp_permute(w, n_head: int):
    """The q/k row permutation llama.cpp's converter applies (transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | os.PathLike, model=None) -> Path:
    """Write `model` (default ``tiny_llama(vocab=TINY_VOCAB + 1)``) as an F32 llama GGUF.

    The file carries a gpt2-style byte-level tokenizer: the vocabulary of
    :func:`tiny_tokenizer` plus one merged token ``"Ġt"`` (GGUF byte-level tokenizers
    need at least one merge), so the model's vocabulary must be ``TINY_VOCAB + 1``.
    Loading the file with transformers gives back `model`'s weights exactly.
    """
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    model = model if model is not None else tiny_llama(vocab=TINY_VOCAB + 1)
    c = model.config
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*SPECIALS, *alphabet, "Ġt"]
    if c.vocab_size != len(tokens):
        raise ValueError(f"`model` must have vocab_size {len(tokens)}, got {c.vocab_size}")
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", np.ascontiguousarray(sd["lm_head.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(capsys, *argv):
    """``llm-adapter *argv`` in-process: ``(exit status, stdout, stderr)``."""
    from llm_adapter.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def dequantized_perplexity(model_dir, layers, text_file, *, seqlen, n_windows=2, dequantize=None):
    """Perplexity of the model in `model_dir` with `layers` written in as dequantized weights
    (``dequantize(layer)``, default ``layer.dequantize()``): what ``evaluate --quantized``
    must report."""
    from llm_adapter import evaluation_windows, load_model, load_text, perplexity

    model, tok = load_model(model_dir)
    with torch.no_grad():
        for name, layer in layers.items():
            W = layer.dequantize() if dequantize is None else dequantize(layer)
            model.get_submodule(name).weight.copy_(torch.from_numpy(W))
    windows = evaluation_windows(tok, load_text(str(text_file), split="evaluation"), n_windows=n_windows,
                                 seqlen=seqlen)
    return perplexity(model, windows, progress=False).ppl

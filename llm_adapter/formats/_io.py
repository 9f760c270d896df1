"""Atomic files and directories, locks, and JSON-safe values: the one place that renames into place.

Every writer of :mod:`llm_adapter` (the native and GPTQ directories, calibration
checkpoints and their manifest, the model cache) goes through :func:`write_file_atomically`
or :func:`write_dir_atomically`: the content is written to a temporary sibling, flushed to
disk (``fsync``), and renamed over the target with :func:`os.replace`, so a reader sees the
old content or the new, never a half-written one; on any failure the temporary is removed.

Writers of one target exclude each other with :func:`claim_dir` (an ``fcntl.flock`` on a
hidden ``.<name>.lock`` file next to the target, taken without waiting: a second run gets
:class:`~llm_adapter.errors.BusyError` naming the path before it does any work). The
holder of the lock also repairs what a killed writer left: a replace interrupted between
its two renames (the target moved aside to ``.<name>.old-*/dir`` and not yet replaced) is
undone by moving the old directory back, and orphaned ``.<name>.tmp-*`` / ``.<name>.old-*``
temporaries are removed. :func:`lock_dir` is the same lock for a directory used in place
(calibration checkpoints: ``<dir>/.lock``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["DirLock", "claim_dir", "jsonable", "lock_dir", "remove_orphans", "repair_dir",
           "write_dir_atomically", "write_file_atomically"]

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
        The lock of :func:`claim_dir` is held throughout (re-entrant in one thread, so a
        caller may hold it already); another writer of `target` raises
        :class:`~llm_adapter.errors.BusyError`, except with ``"keep"``, which waits.
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
    with claim_dir(target, wait=on_exists == "keep"):
        return _write_dir_locked(target, fill, on_exists, mode)


def _write_dir_locked(target: Path, fill, on_exists: str, mode) -> Path:
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
        except BaseException as err:  # also KeyboardInterrupt: never leave the target missing
            if old is not None:
                try:
                    os.replace(old / "dir", target)
                except OSError:
                    keep_old = True  # never delete the only copy of the previous directory
                    logger.error("could not move %s back to %s; the previous contents are kept there",
                                 old / "dir", target)
            elif on_exists == "keep" and target.is_dir() and isinstance(err, OSError):
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


# --------------------------------------------------------------------------- locks
class DirLock:
    """An exclusive ``fcntl.flock`` on a lock file, re-entrant within one thread.

    Other threads and processes that try the same lock file get
    :class:`~llm_adapter.errors.BusyError` (or wait, with ``wait=True``). The lock is
    released by :meth:`release` (or leaving the ``with`` block), which removes the lock
    file, and by the process's death (the kernel drops ``flock`` locks with the file
    descriptor), so a killed run never leaves a stale lock, only an unlocked file. The
    lock file holds the holder's pid, for the message.
    """

    _held: dict = {}  # realpath of the lock file -> [thread ident, fd, depth]
    _guard = threading.Lock()

    def __init__(self, lock_file, what: str, *, wait: bool = False):
        import fcntl

        self.path = Path(lock_file)
        self.key = os.path.realpath(self.path)
        self.what = what
        self.fresh = False  # True when this object took the lock (not a re-entry)
        me = threading.get_ident()
        with DirLock._guard:
            held = DirLock._held.get(self.key)
            if held is not None and held[0] == me:
                held[2] += 1
                return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if wait:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        from ..errors import BusyError

                        holder = _read_pid(fd)
                        raise BusyError(f"{what} is in use by another run{holder}; wait for it to finish "
                                        f"or use another path (lock file {str(self.path)!r})") from None
                try:  # the holder before us may have removed the file: lock the one on disk
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                os.close(fd)
                raise
            break
        with DirLock._guard:
            DirLock._held[self.key] = [me, fd, 1]
        self.fresh = True

    def release(self) -> None:
        """Drop one level of the lock (the last one unlocks and closes the file)."""
        import fcntl

        with DirLock._guard:
            held = DirLock._held.get(self.key)
            if held is None or held[0] != threading.get_ident():
                return
            held[2] -= 1
            if held[2]:
                return
            del DirLock._held[self.key]
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still locked: a waiter re-checks the inode and retries
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return f" (pid {int(text)})" if text else ""
    except (OSError, ValueError):
        return ""


def claim_dir(target, *, wait: bool = False) -> DirLock:
    """Lock directory `target` for writing (``.<name>.lock`` next to it) and repair it.

    Taken once by a writer before its work starts (the CLI holds it from the start of
    ``quantize`` to the final rename) and again, re-entrantly, by
    :func:`write_dir_atomically`. On first taking it, :func:`repair_dir` restores a
    target left missing by a replace killed between its two renames and removes
    orphaned temporaries.

    Parameters
    ----------
    target : str or path-like
        The directory to be written (it need not exist; its parent is created).
    wait : bool
        Wait for another holder instead of raising.

    Returns
    -------
    DirLock
        Use as a context manager or call ``release()``.

    Raises
    ------
    BusyError
        If another thread or process holds the lock (and not `wait`).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> with claim_dir(pathlib.Path(tmp.name) / "out"):
    ...     claim_dir(pathlib.Path(tmp.name) / "out").release()  # re-entrant in one thread
    >>> tmp.cleanup()
    """
    target = Path(os.path.abspath(os.fspath(target)))
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = DirLock(target.parent / f".{target.name}.lock", f"{str(target)!r}", wait=wait)
    if lock.fresh:
        try:
            repair_dir(target)
        except BaseException:
            lock.release()
            raise
    return lock


def repair_dir(target) -> list[str]:
    """Undo what a killed :func:`write_dir_atomically` left next to `target` (call it
    holding :func:`claim_dir`'s lock).

    If `target` is missing and a ``.<name>.old-*/dir`` exists (a replace killed between
    moving the old directory aside and renaming the new one in), the old directory is
    moved back. Then every ``.<name>.tmp-*`` and ``.<name>.old-*`` sibling is removed.

    Returns
    -------
    list of str
        What was done, one line each (also logged at WARNING).
    """
    target = Path(target)
    done = []
    parent = target.parent
    if not parent.is_dir():
        return done
    olds = sorted(parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not target.exists():
        for old in olds:
            if (old / "dir").is_dir():
                os.replace(old / "dir", target)
                _fsync_path(parent)
                done.append(f"restored {str(target)!r} from {old.name} (a replace was interrupted)")
                break
    for orphan in [*parent.glob(f".{target.name}.tmp-*"), *olds]:
        if orphan.exists():
            shutil.rmtree(orphan, ignore_errors=True)
            done.append(f"removed orphaned temporary {str(orphan)!r}")
    for line in done:
        logger.warning("%s", line)
    return done


def lock_dir(directory, what: str) -> DirLock:
    """Lock `directory` (created if needed) for use in place: ``<directory>/.lock``.

    Raises :class:`~llm_adapter.errors.BusyError` if another thread or process holds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return DirLock(directory / ".lock", what)


def remove_orphans(directory, pattern: str = ".*.tmp") -> list[Path]:
    """Remove files matching `pattern` in `directory` (temporaries of
    :func:`write_file_atomically` left by a killed writer); call it holding the lock."""
    removed = []
    for p in Path(directory).glob(pattern):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
                logger.warning("removed orphaned temporary %s", p)
    return removed


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

"""Where dequantized models are cached, and how a cache entry is written atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir`, else ``$BILS_CACHE``, else
    ``$XDG_CACHE_HOME/bils``, else ``~/.cache/bils``."""
    if cache_dir is not None:
        return Path(os.fspath(cache_dir)).expanduser()
    env = os.environ.get("BILS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "bils"
    return Path.home() / ".cache" / "bils"


def file_key(name: str, path: Path) -> str:
    """A cache folder name for `path` seen as model `name`: the name, the file's size
    and mtime, and a short hash of its absolute path (so two files with the same
    name, size and mtime do not collide)."""
    st = path.stat()
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return f"{safe}-{st.st_size}-{st.st_mtime_ns}-{digest}"


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory `target` by calling ``fill(tmp)`` on a fresh temporary
    directory next to it, then renaming it into place.

    A reader never sees a half-written `target`. If another process finished
    `target` first, its copy is kept and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a cache entry is an ordinary folder
        fill(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("cache entry %s was written concurrently; keeping that one", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

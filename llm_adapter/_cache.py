"""Where dequantized models are cached (the entries are written by :mod:`llm_adapter.formats._io`)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


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

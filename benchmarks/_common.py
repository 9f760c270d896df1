"""Helpers shared by the benchmark scripts: machine info, atomic JSON, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import numpy as np
        info["numpy"] = np.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def write_atomically(path, content) -> str:
    """Write `content` (str or bytes) to `path`: temp file in the same folder, fsync, rename.

    The scripts' one atomic writer (the library's is :mod:`llm_adapter.formats._io`; the
    benchmarks do not import it, so bils-only runs need no torch).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(name: str, payload) -> str:
    """Write ``payload`` to ``benchmarks/results/<name>`` atomically."""
    return write_atomically(os.path.join(RESULTS, name), json.dumps(payload, indent=1, default=float))


def write_json_file(path, data) -> None:
    """``data`` as sorted, indented JSON (with a final newline) to `path`, atomically."""
    write_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_doc(path, text: str, begin: str, end: str) -> None:
    """Replace the section of `path` between the markers `begin` and `end` with `text` (or
    append it, to a new ``# Results`` page if `path` does not exist), leaving the rest alone."""
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else "# Results\n\n"
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + block.rstrip("\n") + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    write_atomically(path, new)


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)

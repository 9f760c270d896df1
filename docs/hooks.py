"""MkDocs hooks for the bils site (loaded by ``mkdocs.yml``).

* Pages that other tools generate (``results.md`` from ``benchmarks/llm_quality.py``,
  ``testing.md``) may not exist yet in a fresh clone: their nav entries are dropped and
  links to them become plain text, with an INFO note, so ``--strict`` still passes.
* ``::: identifier`` entries of the API pages whose *module* is not in the tree (a module
  another change has not landed yet) are left out with an INFO note, and ``[text][id]``
  links into such a module become plain text. A misspelt name in an existing module
  still fails the build (mkdocstrings cannot collect it); ``tests/test_docs.py`` checks
  that every public name of every existing module has an entry.
* ``<!-- plot: NAME -->`` in a page becomes the image ``img/NAME.png`` written by
  ``docs/gen_plots.py`` when it exists, else a note saying which benchmark produces it.
"""

from __future__ import annotations

import importlib
import logging
import posixpath
import re
import sys
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.bils")

#: Pages that may be absent (generated or owned elsewhere).
OPTIONAL_PAGES = ("results.md", "testing.md", "solver_quality.md")

#: Plot name -> (alt text, the benchmark whose JSON it needs).
PLOTS = {
    "solver_cost": ("Solver cost relative to the optimum", "benchmarks/solver_quality.py"),
    "klein_tau": ("Klein temperature study", "benchmarks/solver_quality.py"),
    "solver_speed": ("Solver time vs problem size per backend", "benchmarks/cpu_solvers.py and benchmarks/gpu_solvers.py"),
    "llm_ppl": ("Perplexity vs bits per method", "benchmarks/llm_quality.py"),
    "kernel_latency": ("Kernel latency vs batch", "benchmarks/gpu_kernels.py"),
}

_PLOT = re.compile(r"^<!--\s*plot:\s*([\w-]+)\s*-->\s*$", re.M)
_DIRECTIVE = re.compile(r"^:::[ \t]+([\w.]+)[ \t]*\n(?:(?:[ \t]+\S.*)?\n)*?(?=\S|\Z)", re.M)
_IDENT_LINE = re.compile(r"^:::[ \t]+([\w.]+)[ \t]*$", re.M)
_missing: set[str] = set()
_absent_modules: set[str] = set()


def absent_module(identifier: str) -> str | None:
    """The dotted module that ``identifier`` goes through but that cannot be imported.

    ``llm_adapter.new_module.func`` -> ``"llm_adapter.new_module"`` when that module does
    not exist (yet). A missing *leaf* (``bils.misspelt``) is not reported: that is an
    error mkdocstrings should fail on.
    """
    parts = identifier.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return None
    for i in range(1, len(parts) - 1):
        name = ".".join(parts[: i + 1])
        try:
            obj = getattr(obj, parts[i])
            continue
        except AttributeError:
            pass
        except ImportError:  # a lazy attribute whose optional dependency is missing
            return None
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                return name
            return None
        except ImportError:
            return None
    return None


def _filter_nav(items, docs_dir: Path):
    out = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _filter_nav(value, docs_dir)
                if value:
                    out.append({title: value})
                continue
            item_path = value
        else:
            item_path = item
        if (isinstance(item_path, str) and item_path.endswith(".md")
                and item_path in OPTIONAL_PAGES and not (docs_dir / item_path).exists()):
            log.info("page %s not present yet: left out of the nav", item_path)
            _missing.add(item_path)
            continue
        out.append(item)
    return out


def on_config(config, **kwargs):
    docs_dir = Path(config["docs_dir"])
    _missing.clear()
    _absent_modules.clear()
    root = str(Path(config["config_file_path"]).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    idents = [ident for page in sorted((docs_dir / "api").glob("*.md"))
              for ident in _IDENT_LINE.findall(page.read_text(encoding="utf-8"))]
    for ident in idents:
        # an identifier others are nested under is a module: probe it as one
        is_module = any(o.startswith(ident + ".") for o in idents)
        mod = absent_module(ident + "._" if is_module else ident)
        if mod is not None:
            if mod not in _absent_modules:
                log.info("module %s is not in the tree: its API entries are left out", mod)
                _absent_modules.add(mod)
    if config.get("nav"):
        config["nav"] = _filter_nav(config["nav"], docs_dir)
    return config


def _plot_markdown(name: str, page_src: str, docs_dir: Path) -> str:
    alt, source = PLOTS.get(name, (name, "docs/gen_plots.py"))
    img = docs_dir / "img" / f"{name}.png"
    if img.exists():
        rel = posixpath.relpath(f"img/{name}.png", posixpath.dirname(page_src) or ".")
        return f"![{alt}]({rel})"
    return (f'!!! note "Plot not built: {alt}"\n'
            f"    No data yet: run `{source}` to write its JSON under `benchmarks/results/`, "
            "then `make docs`.")


def on_page_markdown(markdown, page, config, files, **kwargs):
    docs_dir = Path(config["docs_dir"])
    markdown = _PLOT.sub(lambda m: _plot_markdown(m.group(1), page.file.src_uri, docs_dir), markdown)
    if _absent_modules:
        def _in_absent(ident):
            return any(ident == m or ident.startswith(m + ".") for m in _absent_modules)

        markdown = _DIRECTIVE.sub(lambda m: "" if _in_absent(m.group(1)) else m.group(0), markdown)
        markdown = re.sub(r"\[([^\]]+)\]\[([\w.]+)\]",
                          lambda m: m.group(1) if _in_absent(m.group(2)) else m.group(0), markdown)
    for missing in _missing:
        # [text](missing.md#anchor) -> text (the page is not built yet)
        pattern = r"\[([^\]]+)\]\((?:\.\./)*" + re.escape(missing) + r"(?:#[^)]*)?\)"
        markdown = re.sub(pattern, r"\1", markdown)
    return markdown

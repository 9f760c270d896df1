"""The documentation site: API reference complete, examples run, strict build passes.

* every name in the ``__all__`` of every public module of ``bils`` and ``llm_adapter``
  has a ``::: identifier`` entry in ``docs/api/*.md`` (the name itself, or the object it
  re-exports) — so a public function added later without an API entry fails here;
* the ```` ```python ```` blocks of every page under ``docs/`` run, page by page in a
  fresh namespace, in a temporary working directory (a block preceded by a
  ``<!-- no-test -->`` line is skipped: it needs the 135M model or a GPU; so is a block
  whose first line is indented, a fragment of an earlier block);
* the docstring ``Examples`` of every public module (shown in the API reference) pass as
  doctests;
* ``docs/gen_plots.py`` writes its plots from whatever ``benchmarks/results/*.json`` exist;
* ``mkdocs build --strict`` succeeds (skipped when mkdocs is not installed:
  ``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("bils", "llm_adapter")

_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.M | re.S)
NO_TEST = "<!-- no-test -->"

#: Pages owned elsewhere whose examples are known to fail: page -> the reason (xfail).
KNOWN_BROKEN: dict[str, str] = {}


# ----------------------------------------------------------------------------- helpers
def public_modules(package: str) -> list[tuple[str, Path]]:
    """``(dotted name, file)`` of every module of ``package`` with no ``_``-prefixed part."""
    base = ROOT / package
    out = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        out.append((".".join(parts), path))
    return out


def static_all(path: Path) -> list[str] | None:
    """The literal ``__all__`` of a module file, without importing it (None if absent)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def _docs_module(name: str):
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DOCS))


def resolve(identifier: str):
    """The object ``identifier`` names at runtime (as a user reaches it), else raise."""
    return _docs_module("griffe_rst").resolve_identifier(identifier)


def absent_module(identifier: str) -> str | None:
    """The module ``identifier`` goes through that is not in the tree (the site leaves it out)."""
    return _docs_module("hooks").absent_module(identifier)


def api_identifiers() -> dict[str, Path]:
    out = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for ident in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            out[ident] = page
    return out


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of the python fences of a page's text, minus those marked no-test."""
    blocks = []
    for m in _FENCE.finditer(text):
        info = m.group("info").strip().split()
        if not info or info[0] not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        if before == NO_TEST:
            continue
        indent = m.group("indent")
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in m.group("body").split("\n"))
        if body[:1].isspace():  # an indented fragment of an earlier block ("fix the line: ...")
            continue
        blocks.append((text.count("\n", 0, m.start()) + 2, body))
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if python_blocks(p.read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------- API coverage
def _public_names():
    for package in PACKAGES:
        for modname, path in public_modules(package):
            if modname.endswith("__main__"):
                continue
            names = static_all(path)
            if names:
                yield modname, names


def test_every_public_name_has_an_api_entry():
    documented = api_identifiers()
    objects = {}
    for ident in documented:
        try:
            objects[ident] = resolve(ident)
        except Exception:  # noqa: BLE001 - unimportable here (e.g. a GPU-only module)
            pass
    missing = []
    for modname, names in _public_names():
        for name in names:
            full = f"{modname}.{name}"
            if full in documented:
                continue
            try:
                obj = resolve(full)
            except Exception:  # noqa: BLE001 - cannot import: only the literal name counts
                missing.append(full)
                continue
            if not any(o is obj for o in objects.values()):
                missing.append(full)
    assert not missing, (
        "public names without an entry in docs/api/*.md (add a `::: module.name` line to the "
        "page of that module):\n  " + "\n  ".join(missing))


def test_api_entries_resolve():
    bad = []
    idents = api_identifiers()
    for ident, page in idents.items():
        is_module = any(o.startswith(ident + ".") for o in idents)
        if absent_module(ident + "._" if is_module else ident) is not None:
            continue  # a module that has not landed yet: the site leaves its entries out
        try:
            resolve(ident)
        except ImportError as exc:
            if "cupy" in str(exc).lower():  # GPU-only module: mkdocstrings reads it statically
                continue
            bad.append(f"{page.name}: {ident} ({exc})")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{page.name}: {ident} ({exc})")
    assert not bad, "API entries naming nothing:\n  " + "\n  ".join(bad)


# ----------------------------------------------------------------------------- examples
@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page, tmp_path, monkeypatch, request):
    rel = str(page.relative_to(DOCS))
    if rel in KNOWN_BROKEN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_BROKEN[rel], strict=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in python_blocks(page.read_text(encoding="utf-8")):
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in PACKAGES:  # a module not landed yet
                pytest.skip(f"{page.relative_to(ROOT)} line {line} needs {exc.name}, not in the tree")
            raise
        except Exception as exc:
            raise AssertionError(f"example at {page.relative_to(ROOT)} line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc


def test_python_fence_parser():
    text = "text\n```python\na = 1\n```\n<!-- no-test -->\n```python\nraise SystemExit\n```\n" \
           "```bash\nmake docs\n```\n    ```python\n    b = 2\n    ```\n```python\n    c = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (13, "b = 2\n")]


def _doctest_modules():
    return [name for package in PACKAGES for name, _ in public_modules(package)
            if not name.endswith("__main__")]


@pytest.mark.parametrize("modname", _doctest_modules())
def test_docstring_examples_run(modname, tmp_path, monkeypatch):
    """The ``Examples`` sections shown in the API reference are doctests that pass."""
    import doctest

    try:
        module = importlib.import_module(modname)
    except ImportError as exc:  # an optional dependency (cupy, hypothesis) is missing
        pytest.skip(f"{modname} not importable here: {exc}")
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, modname) if t.examples]
    out = []
    for t in tests:
        runner.run(t, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(out)


# ----------------------------------------------------------------------------- plots and site
def test_gen_plots_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, str(DOCS / "gen_plots.py"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    results = ROOT / "benchmarks" / "results"
    if (results / "solver_quality.json").exists():
        assert (tmp_path / "solver_cost.png").stat().st_size > 0


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "bils.html").exists()

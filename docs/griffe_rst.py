"""Griffe extension: render the reST bits of our numpydoc docstrings as Markdown.

The docstrings of :mod:`bils` and :mod:`llm_adapter` follow numpydoc (STYLE.md item 12),
which is reStructuredText inside the sections: ``.. math::`` blocks, ``:math:`` and
``:func:`` roles, ``.. [1]`` references. mkdocstrings renders docstring text as Markdown,
so before griffe parses a docstring this extension rewrites, in place:

* ``.. math::`` blocks -> ``$$ ... $$`` and ``:math:`x``` -> ``$x$`` (pymdownx.arithmatex);
* ``:func:`~bils.babai``` (and ``:class:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``,
  ``:exc:``, ``:obj:``) -> an autorefs link ``[`babai`][bils.babai.babai]`` when the target
  is documented in ``docs/api/*.md``, else plain code (so a reference to something not in
  the API pages, e.g. a private helper or numpy, never breaks a ``--strict`` build);
* ``See Also`` entries (``name : text``) -> a bullet list of such links;
* ``.. [1] text`` -> ``- [1] text``, ``[1]_`` -> ``[1]``; ``.. note::``/``.. warning::``
  -> Material admonitions; a paragraph ending in ``::`` -> ``:``.

Targets are resolved by importing them (the runtime attribute, which is what users see:
``bils.babai`` is the function, not the module), relative to the docstring's module,
class and package, and matched by identity against the objects named by the
``::: identifier`` lines of the API pages. Loaded by ``mkdocs.yml`` as
``docs/griffe_rst.py:RstToMarkdown``.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from functools import lru_cache
from pathlib import Path

import griffe

API_DIR = Path(__file__).resolve().parent / "api"

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj|const|term|ref):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_ADMONITION = re.compile(r"^(\s*)\.\. (note|warning|seealso|tip|important|caution)::\s*(.*)$")
_FOOTNOTE = re.compile(r"^(\s*)\.\. \[(\w+)\]\s*(.*)$")
_CITE = re.compile(r"\[(\w+)\]_")
_DIRECTIVE_LINE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def resolve_identifier(identifier: str):
    """The object ``identifier`` names at runtime.

    First as a user would reach it (import the top package, then getattr, importing a
    submodule only where the attribute is missing), so ``bils.babai`` is the function
    that shadows the module of the same name; then by importing the longest module
    prefix and getattr-ing the rest (``bils.babai.babai``). Raises ``ImportError`` or
    ``AttributeError`` when neither works.
    """
    parts = identifier.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for i, attr in enumerate(parts[1:], start=1):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[: i + 1]))
        return obj
    except (ImportError, AttributeError):
        pass
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import any prefix of {identifier!r}")


@lru_cache(maxsize=1)
def documented() -> tuple[tuple[str, object], ...]:
    """``(identifier, object)`` for every ``::: identifier`` line in ``docs/api/*.md``."""
    out = []
    for page in sorted(API_DIR.glob("*.md")):
        for ident in _DIRECTIVE_LINE.findall(page.read_text()):
            try:
                out.append((ident, resolve_identifier(ident)))
            except Exception:  # noqa: BLE001 - an unimportable entry is mkdocstrings' to report
                continue
    return tuple(out)


def _lookup(obj) -> str | None:
    for ident, o in documented():
        if o is obj:
            return ident
    return None


def _candidates(target: str, context: griffe.Object) -> list[str]:
    out = [target]
    mod = context if context.is_module else context.module
    cls = context if context.is_class else (context.parent if context.parent and context.parent.is_class else None)
    if cls is not None:
        out.append(f"{cls.path}.{target}")
    out.append(f"{mod.path}.{target}")
    out.append(f"{mod.path.split('.')[0]}.{target}")
    if mod.parent is not None:
        out.append(f"{mod.parent.path}.{target}")
    return out


def link_for(target: str, context: griffe.Object) -> str | None:
    """Documented identifier that ``target`` (as written in ``context``) refers to, or None."""
    for cand in _candidates(target, context):
        try:
            obj = resolve_identifier(cand)
        except Exception:  # noqa: BLE001 - not this candidate
            continue
        ident = _lookup(obj)
        if ident is not None:
            return ident
        # A method or attribute of a documented class: mkdocstrings renders it under the
        # class's identifier.
        head, _, attr = cand.rpartition(".")
        try:
            owner = resolve_identifier(head) if head else None
        except Exception:  # noqa: BLE001
            owner = None
        if isinstance(owner, type) and not attr.startswith("_"):
            owner_ident = _lookup(owner)
            member = owner.__dict__.get(attr)
            if owner_ident is not None and member is not None and getattr(member, "__doc__", None):
                if callable(member) or isinstance(member, property):
                    return f"{owner_ident}.{attr}"
        return None
    return None


def _role_to_md(match: re.Match, context: griffe.Object) -> str:
    role, text = match.group(1), match.group(2)
    m = re.fullmatch(r"(.*?)\s*<([^>]+)>", text)
    if m:
        title, target = m.group(1), m.group(2)
    else:
        target = text
        title = text[1:].rsplit(".", 1)[-1] if text.startswith("~") else text
    target = target.lstrip("~.!")
    if role in ("func", "meth") and not title.endswith(")"):
        title += "()"
    ident = None if role in ("term", "ref") else link_for(target, context)
    return f"[`{title}`][{ident}]" if ident else f"`{title}`"


def _see_also(lines: list[str]) -> list[str]:
    """Rewrite the body of a numpydoc ``See Also`` section as a bullet list of roles."""
    out: list[str] = []
    for line in lines:
        if not line.strip():
            out.append(line)
            continue
        if line[:1].isspace() and out and out[-1].strip():  # continuation of a description
            out[-1] += " " + line.strip()
            continue
        names, sep, desc = line.partition(" : ")
        if not sep and line.rstrip().endswith(" :"):
            names, desc = line.rstrip()[:-2], ""
        refs = [n.strip() for n in names.split(",") if n.strip()]
        if refs and all(re.fullmatch(r"[\w.~]+(\(\))?", r) for r in refs):
            refs = ", ".join(r if r.startswith(":") else f":obj:`{r.rstrip('()')}`" for r in refs)
            out.append(f"- {refs}" + (f": {desc.strip()}" if desc.strip() else ""))
        else:
            out.append(line)
    return out


#: Sections griffe's numpy parser reads itself (anything else becomes an admonition).
_KNOWN_SECTIONS = {"parameters", "other parameters", "type parameters", "returns", "yields",
                   "receives", "raises", "warns", "examples", "attributes", "functions",
                   "methods", "classes", "type aliases", "modules", "deprecated", "see also"}
_ITEM = re.compile(r"^(?P<names>[\w*][\w*, ]*?)\s+:\s+(?P<type>.+)$|^(?P<bare>[\w*][\w*, ]*)$")


def _custom_section(lines: list[str]) -> list[str]:
    """Body of a non-standard section (``Grid``, ``Solver``...) written like ``Parameters``:
    ``name : type`` items with indented descriptions become a bullet list; prose stays."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _ITEM.match(line) if line and not line[0].isspace() else None
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if m and (m.group("type") or (nxt[:1].isspace() and nxt.strip())):
            desc = []
            j = i + 1
            while j < len(lines) and (lines[j][:1].isspace() or not lines[j].strip()):
                if not lines[j].strip() and (j + 1 >= len(lines) or not lines[j + 1][:1].isspace()):
                    break
                desc.append(lines[j])
                j += 1
            names = m.group("names") or m.group("bare")
            head = ", ".join(f"**`{n.strip()}`**" for n in names.split(",") if n.strip())
            if m.group("type"):
                head += f" (*{m.group('type').strip()}*)"
            body = textwrap.dedent("\n".join(desc)).strip("\n").split("\n") if desc else []
            out.append(f"- {head}" + (f" — {body[0]}" if body and body[0] else ""))
            out += ["  " + b if b.strip() else "" for b in body[1:]]
            i = j
            continue
        if out and out[-1].startswith("- ") and line.strip():
            out.append("")  # prose after a list: a new paragraph
        out.append(line)
        i += 1
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def convert(text: str, context: griffe.Object) -> str:
    """The Markdown version of one docstring (see the module docstring)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        m = _MATH_BLOCK.match(line)
        a = _ADMONITION.match(line)
        if m or a:
            base = _indent(line)
            j = i + 1
            body = []
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
                body.append(lines[j])
                j += 1
            while body and not body[-1].strip():
                body.pop()
                j -= 1
            body = textwrap.dedent("\n".join(body)).strip("\n").split("\n") if body else []
            pad = " " * base
            if m:
                formula = ([m.group(2)] if m.group(2) else []) + [b for b in body if b.strip()]
                out += [pad + "$$"] + [pad + b for b in formula] + [pad + "$$"]
            else:
                kind = {"seealso": "info"}.get(a.group(2), a.group(2))
                first = [a.group(3)] if a.group(3) else []
                out.append(pad + f"!!! {kind}")
                out += [pad + "    " + b if b.strip() else "" for b in first + body]
            i = j
            continue
        header = line.strip().lower()
        if (header and i + 1 < len(lines) and re.fullmatch(r"\s*-{3,}\s*", lines[i + 1])
                and (header == "see also" or header not in _KNOWN_SECTIONS)
                and header not in ("notes", "references", "warnings")):
            j = i + 2
            while j < len(lines) and not (lines[j].strip() and j + 1 < len(lines)
                                          and re.fullmatch(r"\s*-{3,}\s*", lines[j + 1])):
                j += 1
            body = _see_also(lines[i + 2:j]) if header == "see also" else _custom_section(lines[i + 2:j])
            out += [line, lines[i + 1]] + body
            i = j
            continue
        f = _FOOTNOTE.match(line)
        if f:
            line = f"{f.group(1)}- [{f.group(2)}] {f.group(3)}"
        elif line.rstrip().endswith("::") and not line.strip().startswith((">>>", "...")):
            line = line.rstrip()[:-1]
            if line.rstrip().endswith(":") and line.strip() == ":":
                line = ""
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda mm: f"${mm.group(1)}$", text)
    text = _ROLE.sub(lambda mm: _role_to_md(mm, context), text)
    text = _CITE.sub(r"[\1]", text)
    return text


def _comment_doc(obj: griffe.Object) -> str | None:
    """Sphinx-style ``#:`` comment lines right above an attribute's assignment, if any."""
    try:
        lines = Path(obj.filepath).read_text(encoding="utf-8").split("\n")
    except (OSError, TypeError, ValueError):
        return None
    i = (obj.lineno or 0) - 2
    doc: list[str] = []
    while 0 <= i < len(lines) and lines[i].lstrip().startswith("#:"):
        doc.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    return "\n".join(doc) or None


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of a loaded package from numpydoc-reST to Markdown.

    Module attributes documented the Sphinx way (``#:`` comments above the assignment)
    get those comments as their docstring first.
    """

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:  # noqa: ARG002
        seen: set[int] = set()
        self._walk(pkg, seen)

    def _walk(self, obj: griffe.Object, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if obj.is_attribute and obj.docstring is None:
            text = _comment_doc(obj)
            if text:
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None and not getattr(obj.docstring, "_rst_converted", False):
            obj.docstring.value = convert(obj.docstring.value, obj)
            obj.docstring._rst_converted = True  # noqa: SLF001
        for member in obj.members.values():
            if member.is_alias:
                continue
            self._walk(member, seen)

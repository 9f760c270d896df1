r"""The method registry: one :class:`Method` object per quantization method.

A method is one unit: the type of its spec, a pure ``quantize(W, H, D, spec) -> layer``
function, the type of the layer it returns (``to_arrays`` / ``from_arrays`` /
``dequantize``), its stored format inside the native directory, and the torch module that
runs it. The calibration driver, the formats, :mod:`llm_adapter.nn` and the CLI look a
method up here (by name, by spec or by layer) instead of naming it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["LayerFormat", "Method", "register", "unregister", "get", "names", "for_spec", "for_layer", "for_kind",
           "spec_from_dict"]


@dataclass(frozen=True)
class LayerFormat:
    """How one method's layers are stored in the native directory format.

    Attributes
    ----------
    kind : str
        The ``"kind"`` recorded in each layer's metadata (``"uniform"`` is the default
        of format version 1, where the field is absent).
    write : callable
        ``write(name, layer, tensors) -> dict``: add the layer's tensors (keys
        ``f"{name}.<field>"``) to `tensors`, return its JSON metadata entry; raise
        :class:`~llm_adapter.formats.QuantizedFormatError` naming the layer and field.
    read : callable
        ``read(name, meta, get) -> layer`` with ``get(name, field, required=True)``
        returning a stored tensor (or ``None``).
    format_version : int
        The smallest native format version that can hold this kind.
    """

    kind: str
    write: Callable[..., dict]
    read: Callable[..., Any]
    format_version: int = 1


@dataclass(frozen=True)
class Method:
    """One quantization method.

    Attributes
    ----------
    name : str
        The registry key (``spec.method`` of its specs, ``--method`` on the CLI).
    spec_type : type
        Frozen dataclass with ``method``, ``joint``, ``alpha_beta``, ``to_dict``,
        ``from_dict``.
    quantize : callable
        ``quantize(W, H, D, spec, *, backend="auto", rng=None, bias=None) -> layer``: pure,
        numpy in and out.
    layer_type : type
        With ``to_arrays()``, ``metadata()``, ``from_arrays(arrays, meta)`` (classmethod),
        ``dequantize(dtype)``, ``shape`` and ``stats``.
    format : LayerFormat
        Its tensors inside a native directory.
    module : str
        ``"package.module:Class"`` of the torch module that runs a layer (resolved
        lazily: importing the registry never imports torch). The class has
        ``from_layer(layer, *, bias=None)`` and ``supports(layer)``.
    needs_calibration : bool
        ``False``: ``quantize`` needs no ``H`` (the driver runs no forward pass unless asked).
    description : str
        One line for ``--help``.
    cli_options : callable, optional
        ``cli_options(parser)`` adds the method's own ``quantize`` options (called once
        per distinct function, so methods sharing a spec share their options).
    spec_from_cli : callable, optional
        ``spec_from_cli(args) -> spec`` from the parsed ``quantize`` arguments (``args.method``
        is this method's name); raises :class:`~llm_adapter.errors.ParameterError`.
    cli_flags : mapping, optional
        Spec field -> CLI flag where the flag is not ``--<field with dashes>``.
    device_arrays : bool
        ``quantize`` accepts ``W``, ``H``, ``D`` as CuPy arrays and computes on the device
        (``quantize_model(..., device="cuda")`` then hands them over without copies);
        ``False``: the driver copies them to the host first.
    """

    name: str
    spec_type: type
    quantize: Callable[..., Any]
    layer_type: type
    format: LayerFormat
    module: str
    needs_calibration: bool = True
    description: str = ""
    cli_options: Callable[..., None] | None = None
    spec_from_cli: Callable[..., Any] | None = None
    cli_flags: Mapping[str, str] = field(default_factory=dict)
    device_arrays: bool = False

    def flag(self, param: str) -> str:
        """The CLI flag of spec field `param`."""
        return self.cli_flags.get(param, "--" + param.replace("_", "-"))

    def module_class(self):
        """The torch module class named by :attr:`module` (imports it)."""
        mod, _, cls = self.module.partition(":")
        return getattr(importlib.import_module(mod), cls)


_METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add `method` to the registry and return it.

    Raises
    ------
    TypeError
        If `method` is not a :class:`Method`.
    ValueError
        If the name is taken (and not `replace`).
    """
    if not isinstance(method, Method):
        raise TypeError(f"`method` must be a llm_adapter.methods.Method, got {type(method).__name__}")
    if method.name in _METHODS and not replace:
        raise ValueError(f"`method` {method.name!r} is already registered; pass replace=True to replace it")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove method `name` from the registry and return it (:class:`KeyError` if absent)."""
    method = get(name)
    del _METHODS[name]
    return method


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def get(name: str) -> Method:
    """The :class:`Method` called `name`; :class:`KeyError` naming the registered ones otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise KeyError(f"`method` must be one of {names()}, got {name!r}") from None


def for_spec(spec) -> Method:
    """The method of `spec` (``spec.method``), checking the spec's type."""
    method = get(getattr(spec, "method", None))
    if not isinstance(spec, method.spec_type):
        raise TypeError(f"`spec` for method {method.name!r} must be a {method.spec_type.__name__}, "
                        f"got {type(spec).__name__}")
    return method


def for_layer(layer) -> Method:
    """The first registered method whose layer type `layer` is an instance of."""
    for method in _METHODS.values():
        if isinstance(layer, method.layer_type):
            return method
    raise TypeError(f"layer of type {type(layer).__name__} belongs to no registered method "
                    f"(layer types: {sorted({m.layer_type.__name__ for m in _METHODS.values()})})")


def for_kind(kind: str) -> Method:
    """The first registered method whose stored format kind is `kind`."""
    for method in _METHODS.values():
        if method.format.kind == kind:
            return method
    raise KeyError(f"no registered method stores layers of kind {kind!r}")


def spec_from_dict(d: dict):
    """Rebuild a spec from its ``to_dict()`` (the ``method`` key picks the type)."""
    return get(d.get("method", "gptq")).spec_type.from_dict(d)

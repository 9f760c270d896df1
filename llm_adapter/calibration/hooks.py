"""Forward pre-hooks registered through one helper and always removed."""

from __future__ import annotations

import contextlib

__all__ = ["forward_pre_hooks"]


@contextlib.contextmanager
def forward_pre_hooks(modules, hook):
    """Register ``hook(name, module, args)`` as a forward pre-hook on every module of
    ``modules`` (a ``{name: module}`` dict); always removed on exit.

    A context manager: the hooks are active inside the ``with`` block only, and removed
    even when the block raises (e.g. an exception used to stop a forward pass early).

    Parameters
    ----------
    modules : dict of str to torch.nn.Module
        The modules to hook, by name (the name is passed to `hook`).
    hook : callable
        ``hook(name, module, args)``, called before each forward of a hooked module with
        its positional inputs ``args``; its return value is ignored.

    Yields
    ------
    None

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> seen = []
    >>> with forward_pre_hooks({"first": net[0], "last": net[2]},
    ...                        lambda name, m, args: seen.append((name, tuple(args[0].shape)))):
    ...     _ = net(torch.zeros(5, 4))
    >>> seen
    [('first', (5, 4)), ('last', (5, 3))]
    >>> _ = net(torch.zeros(5, 4))  # the hooks are gone
    >>> len(seen)
    2
    """
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, _name=name: hook(_name, m, args)))
        yield
    finally:
        for h in handles:
            h.remove()

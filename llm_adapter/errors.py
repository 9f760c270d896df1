"""Error types of :mod:`llm_adapter` that carry what they are about.

:class:`ParameterError` names the offending parameter in an attribute, so a front end
(the CLI) maps it to its own option name without reading the message.
"""

from __future__ import annotations

__all__ = ["BusyError", "CheckpointError", "IntegrityWarning", "ParameterError", "QuantizedFormatError"]


class ParameterError(ValueError):
    """A :class:`ValueError` about one parameter, named in :attr:`param`.

    Parameters
    ----------
    param : str
        The parameter (spec field or keyword argument), e.g. ``"group_size"``.
    message : str
        The full message (it names the parameter and the rule, as every message here).

    Examples
    --------
    >>> err = ParameterError("bits", "`bits` must be an int in [2, 8], got 9")
    >>> err.param, str(err)
    ('bits', '`bits` must be an int in [2, 8], got 9')
    """

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class QuantizedFormatError(ValueError):
    """A quantized directory (or the layers given to save) is malformed.

    A :class:`ValueError`; the message names the file or layer and the field.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from llm_adapter.formats import save_quantized
    >>> from llm_adapter.methods.uniform import QuantizedLayer
    >>> bad = QuantizedLayer(codes=np.zeros((2, 8), np.uint8), scales=np.ones((2, 1), np.float32),
    ...                      zeros=np.zeros((2, 1), np.float32), g_idx=np.zeros(4, np.int32),
    ...                      bits=4, group_size=-1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_quantized(f"{tmp}/out", {"fc": bad})
    Traceback (most recent call last):
        ...
    llm_adapter.errors.QuantizedFormatError: layer 'fc': `g_idx` must be an integer array of shape (8,), got int32 (4,)
    """


class CheckpointError(ParameterError, QuantizedFormatError):
    """A calibration checkpoint directory cannot be used: another model or spec, a
    corrupt or mismatched layer file, or another run holding it.

    A :class:`ParameterError` about ``checkpoint_dir`` (the CLI maps it to
    ``--checkpoint``) and a :class:`QuantizedFormatError`; the message names the
    directory or file and what differs.

    Examples
    --------
    >>> err = CheckpointError("`checkpoint_dir` 'ck': layer file 'ck/fc.npz' is truncated")
    >>> err.param, isinstance(err, QuantizedFormatError), isinstance(err, ValueError)
    ('checkpoint_dir', True, True)
    """

    def __init__(self, message: str):
        super().__init__("checkpoint_dir", message)


class BusyError(RuntimeError):
    """A directory is being written (or a checkpoint directory used) by another run.

    Raised before any work starts; the message names the path and the process holding it.

    Examples
    --------
    >>> str(BusyError("'out' is being written by another run (pid 12)"))
    "'out' is being written by another run (pid 12)"
    """


class IntegrityWarning(UserWarning):
    """A file was loaded without an integrity check (written before checksums existed)."""

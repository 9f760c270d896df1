"""Pack unsigned b-bit integers into int32 words, the GPTQ way.

Along the packed axis the values form one little-endian bit stream: value ``k`` occupies
bits ``[b*k, b*k + b)``, and stream bit ``t`` is bit ``t % 32`` of word ``t // 32``. For
``b`` in {2, 4, 8} that is ``32 // b`` values per word, the first value in the lowest
bits; for ``b = 3`` it is 32 values in 3 words, with value 10 split over words 0 and 1
(bits 30–31 | bit 0) and value 21 over words 1 and 2 (bit 31 | bits 0–1). This is the
layout of AutoGPTQ's ``pack`` (``qweight`` along the input dimension, ``qzeros`` along
the output dimension), read by transformers, vLLM, exllama and GPTQModel.

The axis is padded with zero values to a whole number of *periods* — the smallest run of
values that fills whole words: ``32 // gcd(b, 32)`` values in ``b // gcd(b, 32)`` words
(8 values / 1 word at 4 bits, 32 values / 3 words at 3 bits) — so ``n`` values take
``ceil(n / period) * period * b / 32`` words, exactly ``n * b / 32`` when ``n`` is a
multiple of the period. :func:`unpack` needs ``n`` back to drop the padding.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SUPPORTED_BITS", "pack", "pack_width", "packed_length", "period", "unpack"]

#: Code widths the packers accept.
SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def period(bits: int) -> tuple[int, int]:
    """``(values, words)``: the smallest number of b-bit values that fills whole int32 words.

    >>> period(4), period(3), period(2)
    ((8, 1), (32, 3), (16, 1))
    """
    bits = _check_bits(bits)
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def pack_width(max_bits: int) -> int:
    """The smallest width of :data:`SUPPORTED_BITS` that holds codes of `max_bits` bits.

    Parameters
    ----------
    max_bits : int
        The widest code to store (e.g. ``max(group_bits)`` of a glvq layer).

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If `max_bits` exceeds the widest supported width.

    Examples
    --------
    >>> pack_width(1), pack_width(2), pack_width(3), pack_width(5)
    (2, 2, 3, 8)
    """
    for w in SUPPORTED_BITS:
        if w >= max_bits:
            return w
    raise ValueError(f"codes of {max_bits} bits cannot be packed (at most {max(SUPPORTED_BITS)})")


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding `n` b-bit values (padded to whole periods).

    Parameters
    ----------
    n : int
        Number of values along the packed axis.
    bits : {2, 3, 4, 8}

    Returns
    -------
    int
        ``ceil(n / values) * words`` with ``(values, words) = period(bits)``.

    Raises
    ------
    ValueError
        If `bits` is unsupported.

    Examples
    --------
    >>> packed_length(128, 3), packed_length(33, 4), packed_length(0, 2)
    (12, 5, 0)
    """
    values, words = period(bits)
    return -(-int(n) // values) * words


def _layout(bits: int):
    """Per position k of a 32-value block: word index, shift, and whether it straddles."""
    offsets = bits * np.arange(32)
    word = offsets // 32
    shift = offsets % 32
    straddle = shift + bits > 32
    return word, shift, straddle


def pack(values, bits: int, axis: int = 0) -> np.ndarray:
    """Pack unsigned `bits`-bit integers along `axis` into int32 words.

    Parameters
    ----------
    values : array_like of integers
        Every entry in ``[0, 2**bits - 1]``.
    bits : {2, 3, 4, 8}
    axis : int
        The axis to pack; its length ``n`` becomes :func:`packed_length` ``(n, bits)``.

    Returns
    -------
    ndarray of int32
        The words (bit patterns of uint32 reinterpreted as int32, as in GPTQ checkpoints).

    Raises
    ------
    ValueError
        If `bits` is unsupported, or `values` is not integer or has an entry outside
        ``[0, 2**bits - 1]``.

    Examples
    --------
    >>> pack([1, 2, 3, 4, 5, 6, 7, 8], 4)
    array([-2023406815], dtype=int32)
    >>> hex(pack([1, 2, 3, 4, 5, 6, 7, 8], 4).view("uint32")[0])
    '0x87654321'
    """
    bits = _check_bits(bits)
    arr = np.asarray(values)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"`values` must be integers, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError("`values` must have at least one dimension")
    axis = _check_axis(axis, arr.ndim)
    if arr.size and (arr.min() < 0 or arr.max() > (1 << bits) - 1):
        raise ValueError(
            f"`values` must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
            f"got range [{arr.min()}, {arr.max()}]"
        )
    moved = np.moveaxis(arr, axis, -1).astype(np.uint64)
    lead, n = moved.shape[:-1], moved.shape[-1]
    n_values, n_words = period(bits)
    n_pad = -(-n // n_values) * n_values
    # Work in whole 32-value blocks (b words each); trim to whole periods at the end.
    n_block_pad = -(-n // 32) * 32
    padded = np.zeros((*lead, n_block_pad), dtype=np.uint64)
    padded[..., :n] = moved
    blocks = padded.reshape(*lead, n_block_pad // 32, 32)
    words = np.zeros((*lead, n_block_pad // 32, bits), dtype=np.uint64)
    word, shift, straddle = _layout(bits)
    for k in range(32):
        v = blocks[..., k] << np.uint64(shift[k])
        words[..., word[k]] |= v & np.uint64(0xFFFFFFFF)
        if straddle[k]:
            words[..., word[k] + 1] |= v >> np.uint64(32)
    flat = words.reshape(*lead, -1)[..., : n_pad * bits // 32]
    out = flat.astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def unpack(words, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`pack`: the first `n` b-bit values along `axis`, as uint8.

    Parameters
    ----------
    words : array_like of int32 or uint32
        Packed words; the length along `axis` must be :func:`packed_length` ``(n, bits)``.
    bits : {2, 3, 4, 8}
    n : int
        Number of values to return along `axis`.
    axis : int

    Returns
    -------
    ndarray of uint8

    Raises
    ------
    ValueError
        If `bits` is unsupported, `words` is not 32-bit integer, or its length along
        `axis` does not match `n`.

    Examples
    --------
    >>> unpack(pack([[5], [0], [7]], 3), 3, 3)[:, 0]
    array([5, 0, 7], dtype=uint8)
    """
    bits = _check_bits(bits)
    arr = np.asarray(words)
    if arr.dtype not in (np.dtype(np.int32), np.dtype(np.uint32)):
        raise ValueError(f"`words` must be int32 or uint32, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError("`words` must have at least one dimension")
    axis = _check_axis(axis, arr.ndim)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    expected = packed_length(n, bits)
    if arr.shape[axis] != expected:
        raise ValueError(
            f"`words` has {arr.shape[axis]} words along axis {axis}; {n} values of "
            f"{bits} bits need {expected}"
        )
    moved = np.moveaxis(arr.view(np.uint32), axis, -1).astype(np.uint64)
    lead, m = moved.shape[:-1], moved.shape[-1]
    n_blocks = -(-m // bits)
    padded = np.zeros((*lead, n_blocks * bits), dtype=np.uint64)
    padded[..., :m] = moved
    blocks = padded.reshape(*lead, n_blocks, bits)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((*lead, n_blocks, 32), dtype=np.uint8)
    word, shift, straddle = _layout(bits)
    for k in range(32):
        v = blocks[..., word[k]] >> np.uint64(shift[k])
        if straddle[k]:
            v |= blocks[..., word[k] + 1] << np.uint64(32 - shift[k])
        out[..., k] = (v & mask).astype(np.uint8)
    values = out.reshape(*lead, n_blocks * 32)[..., :n]
    return np.ascontiguousarray(np.moveaxis(values, -1, axis))


def _check_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"`axis` must be an int in [{-ndim}, {ndim - 1}], got {axis!r}")
    return int(axis) % ndim

r"""numba-cuda kernels: dequantize-GEMV/GEMM from the packed GPTQ layout, and the glvq transform.

Private: :mod:`llm_adapter.kernels` validates, allocates and launches. Imported lazily
(it imports numba). The same code runs on a device, in numba-cuda's simulator
(``NUMBA_ENABLE_CUDASIM=1``, numpy arrays) and compiles with ``numba.cuda.compile_ptx``.

``qmm`` — one kernel for every batch tile ``NB`` (compile-time), bits ``BITS`` in
{2, 3, 4, 8}. ``qweight`` is ``(words, out)`` int32, codes packed along the input dim as a
little-endian bit stream (:mod:`llm_adapter.formats.packing`): a *period* of ``P`` values
fills ``W`` whole words (8/1 at 4 bits, 16/1 at 2, 32/3 at 3, 4/1 at 8). Thread
``(tx, ty)`` of block ``(bx, by)`` owns output column ``j = bx * TX + tx`` and the ``ty``-th
of ``TY`` contiguous runs of periods of the block's input slice ``[by * KV, (by + 1) * KV)``
(so a group's scale and zero are loaded once per run); a warp reads 32 consecutive words of
one packed row (coalesced). Per period of group ``g``:

.. math::

    \mathrm{acc}_b \mathrel{+}= s_{gj} \Big(\sum_{t<P} x_{b,i_t} q_{i_t j} - z_{gj} \sum_{t<P} x_{b,i_t}\Big)

(static groups of ``2**gshift`` columns, ``g = i >> gshift``) with the per-period sums of
``x`` precomputed in shared memory, so a weight costs a shift, a mask-or and one FMA per
batch row: the code becomes the float ``f = 1 + q / 2**bits`` by moving its bits to the top
of the mantissa of 1.0 (no integer-to-float conversion, no subtraction), and
``sum_t x_t q_t = 2**bits (sum_t x_t f_t - sum_t x_t)``. With ``use_gidx`` (act-order
``g_idx``, or a group size that is not a power of two or splits a period) the group is looked up per
value from shared memory instead. The ``TY`` partial sums meet in shared memory (no warp
shuffles: the simulator has none); with a split-K grid (``gridDim.y > 1``) each block
writes its partial to ``part`` and the last block of a column tile (an atomic counter,
reset by that block, so the kernel can be replayed in a CUDA graph) adds them up. The
finishing block writes ``y = acc + escale_j * sum(eparts[b]) + bias_j`` in ``y``'s dtype;
the ``eparts`` term carries the glvq centre (``n_eparts = 0`` for GPTQ).

``glvq_transform`` — ``u[b, p] = sum_i G_g[i, k] c_{s0+i} x[b, s0+i]`` (``p = s0 + k``,
sub-vectors of ``d``), and per block the partial ``sum_p centre_g(p) u[b, p]`` in
``cparts[b, block]`` (tree reduction in shared memory).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import config, cuda, float32, int32, uint32, uint64

from ..formats.packing import period

#: True when numba-cuda runs kernels in its simulator (process-wide switch).
SIMULATOR = bool(config.ENABLE_CUDASIM)

#: Batch tiles up to this size load a thread's whole run of words first (see qmm_source).
PREFETCH_MAX_TILE = 2
#: ... when the run has at most this many words (registers; 8-bit runs take the loop).
PREFETCH_MAX_WORDS = 16

_MAGIC = 0x4B000000  # exponent of 2**23: as_float(_MAGIC | q) == 2**23 + q for q < 2**23
_MAGIC_F = 8388608.0

if SIMULATOR:

    def bits_as_float(i):
        """Reinterpret the bits of an int32 as float32 (simulator version)."""
        return np.int32(i).view(np.float32)

else:  # pragma: no cover - needs the CUDA toolchain (compiled in the PTX tests)
    from numba.cuda import libdevice

    bits_as_float = libdevice.int_as_float


def _mantissa(src: str, bits: int, s: int) -> str:
    """Source moving bits ``[s, s + bits)`` of uint64 `src` to the top of a float32 mantissa
    (bits ``[23 - bits, 23)``): or-ed with the bits of 1.0 it is the float ``1 + q / 2**bits``."""
    target = 23 - bits
    e = f"({src} >> U[{s - target}])" if s > target else (f"({src} << U[{target - s}])" if s < target else src)
    return f"({e} & QMASK)"


_QMM_TEMPLATE = """
def qmm(x, qw, scales, zeros, gidx, use_gidx, gshift, n_in, bias, has_bias, eparts, escale, n_eparts,
        part, counters, y):
    sx = cuda.shared.array((KV, NB), float32{align})
    sxs = cuda.shared.array((NB, NPER), float32)
    sg = cuda.shared.array(KV, int32)
    red = cuda.shared.array((TY, NB, TX), float32)
    last = cuda.shared.array(1, int32)
    txi = cuda.threadIdx.x
    tyi = cuda.threadIdx.y
    tid = tyi * TX + txi
    nbatch = x.shape[0]
    n_out = qw.shape[1]
    n_words = qw.shape[0]
    j = cuda.blockIdx.x * TX + txi
    split = cuda.blockIdx.y
    n_split = cuda.gridDim.y
    v0 = split * KV

    # stage the slice of x (float32, zero-padded) and, for act-order, the groups
    for e in range(tid, NB * KV, NT):
        b = e // KV
        v = e - b * KV
        i = v0 + v
        val = float32(0.0)
        if b < nbatch and i < n_in:
            val = float32(x[b, i])
        sx[v, b] = val
        if b == 0:
            gv = 0
            if use_gidx != 0 and i < n_in:
                gv = gidx[i]
            sg[v] = gv
    cuda.syncthreads()
    for e in range(tid, NB * NPER, NT):
        b = e // NPER
        p = e - b * NPER
        s = float32(0.0)
        for t in range(P):
            s += sx[p * P + t, b]
        sxs[b, p] = s
    cuda.syncthreads()

{init_acc}
    if j < n_out:
        ju = uint64(j)
        gcur = uint64(NOGROUP)
        sc = float32(0.0)
        zc = float32(0.0)
        p0 = tyi * NPT
        if PREFETCH and use_gidx == 0:
            # every word of the thread's run is loaded first (NPT * W loads in flight)
            p0u = uint64(p0)
            kb = (split * NPER + p0) * W
{prefetch_body}
        else:
            for p in range(p0, min(p0 + NPT, NPER)):
                k = (split * NPER + p) * W
                if k >= n_words:
                    break
                ku = uint64(k)
{load_words}
                base = uint64(p) * U[P]
                if use_gidx == 0:
                    g = uint64(v0 + p * P) >> uint64(gshift)
                    if g != gcur:
                        gcur = g
                        sc = float32(scales[g, ju])
                        zc = float32(zeros[g, ju])
                    pu = uint64(p)
{static_body}
                else:
{gidx_body}
{store_acc}
    cuda.syncthreads()
    if tyi == 0 and j < n_out:
        for b in range(NB):
            if b < nbatch:
                tot = float32(0.0)
                for r in range(TY):
                    tot += red[r, b, txi]
                if n_split == 1:
                    if n_eparts > 0:
                        ce = float32(0.0)
                        for t in range(n_eparts):
                            ce += eparts[b, t]
                        tot += float32(escale[j]) * ce
                    if has_bias != 0:
                        tot += float32(bias[j])
                    y[b, j] = tot
                else:
                    part[split, b, j] = tot
    if n_split > 1:
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            seen = cuda.atomic.add(counters, cuda.blockIdx.x, 1)
            last[0] = 1 if seen == n_split - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:
            if tid == 0:
                counters[cuda.blockIdx.x] = 0
            if tyi == 0 and j < n_out:
                for b in range(NB):
                    if b < nbatch:
                        tot = float32(0.0)
                        for s in range(n_split):
                            tot += part[s, b, j]
                        if n_eparts > 0:
                            ce = float32(0.0)
                            for t in range(n_eparts):
                                ce += eparts[b, t]
                            tot += float32(escale[j]) * ce
                        if has_bias != 0:
                            tot += float32(bias[j])
                        y[b, j] = tot
"""


def _static_body(bits: int, nb: int, ind: str, words=("w0", "w1", "w2")) -> list:
    """Lines of one period with static groups: ``d_b = sum_t x_bt f_t`` written out, then
    ``a_b += sc (2**bits d_b - (2**bits + zc) sum_t x_bt)``; uses ``base`` and ``pu``."""
    P, _ = period(bits)
    w0, w1, w2 = words
    out = [ind + f"d{b} = float32(0.0)" for b in range(nb)]
    ch = min(P, 32 // bits, 8)  # codes per chunk: one chunk fits in 32 bits
    if ch == P:  # 4 and 8 bits: one word per period, written out
        for t in range(P):
            out.append(ind + f"f = bits_as_float(int32(ONE | {_mantissa(w0, bits, bits * t)}))")
            out += [ind + f"d{b} += sx[base + U[{t}], U[{b}]] * f" for b in range(nb)]
    else:
        # 2 and 3 bits: a loop over chunks of `ch` codes (ch * bits <= 32 bits, read from the
        # 64-bit concatenation of two adjacent words), each chunk written out; a fully
        # written-out 3-bit period (32 codes x 16 rows) takes LLVM minutes to compile
        out += [ind + f"for c in range({P // ch}):",
                ind + f"    off = uint64(c) * U[{ch * bits}]",
                ind + "    wi = off >> U[5]",
                ind + "    sh = off & U[31]",
                ind + f"    wlo = {w0} if wi == U[0] else ({w1} if wi == U[1] else {w2})",
                ind + f"    whi = {w1} if wi == U[0] else {w2}",
                ind + f"    chunk = ((wlo | (whi << U[32])) >> sh) & U64MASK{ch * bits}",
                ind + f"    cb = base + uint64(c) * U[{ch}]"]
        for t in range(ch):
            out.append(ind + f"    f = bits_as_float(int32(ONE | {_mantissa('chunk', bits, bits * t)}))")
            out += [ind + f"    d{b} += sx[cb + U[{t}], U[{b}]] * f" for b in range(nb)]
    # f = 1 + q / 2**bits, so sum x q = 2**bits (sum x f - sum x)
    out += [ind + f"a{b} += sc * (QS * d{b} - (QS + zc) * sxs[U[{b}], pu])" for b in range(nb)]
    return out


def qmm_source(bits: int, nb: int, npt: int, prefetch: bool) -> str:
    """The generated source of the qmm kernel for `bits`, batch tile `nb`, `npt` periods per
    thread, and whether the run's words are all loaded first (`prefetch`, small tiles).

    The period body is written out (one line per code and batch row), with compile-time
    shifts and masks, unsigned indices (no negative-index wraparound code) and scalar
    accumulators, so the hot loop is straight-line register code. With `prefetch` the
    whole run of `npt` periods is written out after its ``npt * W`` loads, so that many
    loads are in flight per thread (memory-level parallelism for the batch-1 GEMV).
    """
    P, W = period(bits)
    init_acc = "\n".join(f"    a{b} = float32(0.0)" for b in range(nb))
    ind = " " * 16
    load = [f"{ind}w0 = uint64(uint32(qw[ku, ju]))"]
    for w in range(1, W):
        load.append(f"{ind}w{w} = uint64(uint32(qw[ku + U[{w}], ju]))")
    if W == 1:
        load += [f"{ind}w1 = w0", f"{ind}w2 = w0"]
    static = _static_body(bits, nb, " " * 20)
    # per-value groups (act-order): a plain loop over the period (the slow path; keeps the
    # kernel small), the code read from the 64-bit concatenation of two adjacent words
    ind = " " * 20
    gidx = [ind + "for t in range(P):",
            ind + "    off = uint64(t) * U[BITS]",
            ind + "    wi = off >> U[5]",
            ind + "    sh = off & U[31]",
            ind + "    wlo = w0 if wi == U[0] else (w1 if wi == U[1] else w2)",
            ind + "    whi = w1 if wi == U[0] else w2",
            ind + "    q = ((wlo | (whi << U[32])) >> sh) & U[MASK]",
            ind + "    f = bits_as_float(int32(MAGIC | q)) - MAGIC_F",
            ind + "    g = uint64(sg[base + uint64(t)])",
            ind + "    f = float32(scales[g, ju]) * (f - float32(zeros[g, ju]))"]
    gidx += [ind + f"    a{b} += sx[base + uint64(t), U[{b}]] * f" for b in range(nb)]
    pre = []
    if prefetch:
        ind = " " * 12
        for r in range(npt):
            pre.append(f"{ind}ok{r} = p0 + {r} < NPER and kb + {r * W} < n_words")
            for w in range(W):
                pre.append(f"{ind}w{r}_{w} = uint64(uint32(qw[uint64(kb + {r * W + w}), ju])) if ok{r} else U[0]")
        for r in range(npt):
            words = tuple(f"w{r}_{min(w, W - 1)}" for w in range(3))
            pre += [f"{ind}if ok{r}:",
                    f"{ind}    pu = p0u + U[{r}]",
                    f"{ind}    base = pu * U[P]",
                    f"{ind}    g = uint64(v0 + (p0 + {r}) * P) >> uint64(gshift)",
                    f"{ind}    if g != gcur:",
                    f"{ind}        gcur = g",
                    f"{ind}        sc = float32(scales[g, ju])",
                    f"{ind}        zc = float32(zeros[g, ju])"]
            pre += _static_body(bits, nb, ind + "    ", words)
    else:
        pre.append(" " * 12 + "pass")
    store = "\n".join(f"    red[tyi, {b}, txi] = a{b}" for b in range(nb))
    # 16-byte rows of batch values let LLVM load four rows at once (ld.shared.v4); the
    # simulator has no alignment option
    align = "" if SIMULATOR else ", alignment=16"
    return _QMM_TEMPLATE.format(align=align, init_acc=init_acc, load_words="\n".join(load),
                                static_body="\n".join(static), gidx_body="\n".join(gidx),
                                prefetch_body="\n".join(pre), store_acc=store)


@functools.lru_cache(maxsize=None)
def qmm_kernel(bits: int, nb: int, tx: int, ty: int, kv: int):
    """The dequantize-GEMM kernel for `bits`, batch tile `nb` and launch sizes (tx, ty, kv).

    Launch: ``grid = (ceil(out / tx), ceil(in / kv))``, ``block = (tx, ty)``. Arguments:
    ``(x, qweight, scales, zeros, gidx, use_gidx, gshift, n_in, bias, has_bias, eparts,
    escale, n_eparts, part, counters, y)``. Source: :func:`qmm_source`.
    """
    P, W = period(bits)
    if kv % P:
        raise ValueError(f"`kv` = {kv} must be a multiple of the period {P} of {bits}-bit codes")
    scope = {
        "cuda": cuda, "float32": float32, "int32": int32, "uint32": uint32, "uint64": uint64,
        "bits_as_float": bits_as_float, "MAGIC": np.uint64(_MAGIC), "MAGIC_F": float32(_MAGIC_F),
        "ONE": np.uint64(0x3F800000), "QMASK": np.uint64(((1 << bits) - 1) << (23 - bits)),
        "QS": float32(2.0 ** bits),
        "U": tuple(np.uint64(i) for i in range(max(64, (1 << bits)))),
        "NB": int(nb), "TX": int(tx), "TY": int(ty), "KV": int(kv), "NPER": int(kv) // P, "NT": int(tx) * int(ty),
        "NPT": -(-(int(kv) // P) // int(ty)), "NOGROUP": np.uint64(2**63),
        "P": P, "W": W, "BITS": int(bits), "MASK": (1 << int(bits)) - 1,
        "U64MASK16": np.uint64(0xFFFF), "U64MASK24": np.uint64(0xFFFFFF), "U64MASK32": np.uint64(0xFFFFFFFF),
    }
    npt = scope["NPT"]
    prefetch = int(nb) <= PREFETCH_MAX_TILE and npt * W <= PREFETCH_MAX_WORDS
    scope["PREFETCH"] = prefetch
    source = qmm_source(bits, nb, npt, prefetch)
    exec(compile(source, f"<llm_adapter.kernels qmm bits={bits} nb={nb}>", "exec"), scope)  # noqa: S102
    return cuda.jit(scope["qmm"])


@functools.lru_cache(maxsize=None)
def transform_kernel(threads: int):
    """The glvq transform for blocks of `threads` (a power of two).

    Launch: ``grid = (ceil(in / threads), batch)``, ``block = threads``. Arguments:
    ``(x, generators, col_scale, has_col_scale, centre, d, gsize, u, cparts)``.
    """
    T = int(threads)
    if T < 1 or T & (T - 1):
        raise ValueError(f"`threads` must be a power of two, got {threads}")

    @cuda.jit
    def glvq_transform(x, gen, col_scale, has_cs, centre, d, gsize, u, cparts):
        sm = cuda.shared.array(T, float32)
        tid = cuda.threadIdx.x
        p = cuda.blockIdx.x * T + tid
        b = cuda.blockIdx.y
        n_in = x.shape[1]
        cval = float32(0.0)
        if p < n_in:
            s0 = (p // d) * d
            kk = p - s0
            g = p // gsize
            a = float32(0.0)
            for i in range(d):
                xi = float32(x[b, s0 + i])
                if has_cs != 0:
                    xi *= float32(col_scale[s0 + i])
                a += float32(gen[g, i, kk]) * xi
            u[b, p] = a
            cval = a * centre[g]
        sm[tid] = cval
        cuda.syncthreads()
        h = T // 2
        while h > 0:
            if tid < h:
                sm[tid] += sm[tid + h]
            cuda.syncthreads()
            h //= 2
        if tid == 0:
            cparts[b, cuda.blockIdx.x] = sm[0]

    return glvq_transform

"""Byte-flip fuzzing of every stored format of llm_adapter (issue #17, reproducers 10-11).

Each case flips one random byte (XOR with a random non-zero mask) at a uniformly random
position of one region of one file, loads the file with the library's reader, restores
the byte, and classifies the outcome:

* ``clear_error`` — a :class:`~llm_adapter.errors.QuantizedFormatError` (or its
  subclasses ``CheckpointError`` / ``GPTQExportError``) whose message names the file or
  its directory;
* ``correct`` — loaded, and equal to what was saved (arrays, dtypes, metadata): the flip
  hit bytes the format ignores (JSON whitespace, header padding);
* ``silent_wrong`` — loaded something different without an error (the failure this exists
  to find);
* ``crash`` — any other exception, or a format error that does not name the file;
* ``hang`` — the load took longer than ``--timeout`` seconds (SIGALRM).

Files (built once from random layers and the tiny test Llama):

========================  =====================================================  ========================
family                    file                                                   reader
========================  =====================================================  ========================
native_v1.*               quant_config.json / quantized.safetensors, uniform     ``load_quantized``
native_v2.*               same, a uniform and a glvq layer (format version 2)    ``load_quantized``
gptq.*                    config.json / model.safetensors of ``export_gptq``     ``verify_gptq``
ckpt_npz_uniform.*        a uniform checkpoint layer (.npz, perm and bias)       ``load_layer``
ckpt_npz_glvq.*           a glvq checkpoint layer (.npz)                         ``load_layer``
ckpt_st_uniform.*         a uniform checkpoint layer (.safetensors)              ``load_layer``
ckpt_st_glvq.*            a glvq checkpoint layer (.safetensors)                 ``load_layer``
manifest                  a checkpoint directory's manifest.json                 ``check_manifest``
========================  =====================================================  ========================

Regions: ``tensor`` (the tensor data: the bytes after a safetensors header; the array
members of an npz), ``header`` (a safetensors header), ``meta`` (an npz's metadata
member), ``container`` (zip structures of an npz), ``config`` (a JSON file).
Targets: 100 % of ``tensor`` flips detected; 0 silent wrong, 0 crash, 0 hang overall.

Usage::

    nice -n 10 python benchmarks/fuzz_formats.py --cases 10000 [--seed 0] [--timeout 10]

writes ``benchmarks/results/fuzz_formats.json`` (counts per family/region and outcome,
the first few non-clear outcomes with their details, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

OUTCOMES = ("clear_error", "correct", "silent_wrong", "crash", "hang")


class _Hang(Exception):
    pass


# ---------------------------------------------------------------------------- artifacts
def _uniform(rng, out, inp, bits, gs, perm=False):
    from llm_adapter.methods.uniform import QuantizedLayer

    ng = -(-inp // gs)
    g = (np.arange(inp) // gs).astype(np.int32)
    p = None
    if perm:
        p = rng.permutation(inp)
        g = np.empty(inp, np.int32)
        g[p] = np.arange(inp) // gs
    return QuantizedLayer(codes=rng.integers(0, 2**bits, (out, inp)).astype(np.uint8),
                          scales=rng.uniform(0.01, 1, (out, ng)).astype(np.float32),
                          zeros=rng.integers(0, 2**bits, (out, ng)).astype(np.float32),
                          g_idx=g, bits=bits, group_size=gs, perm=p,
                          bias=rng.standard_normal(out).astype(np.float32), stats={"loss": 0.25, "method": "gptq"})


def _glvq(rng):
    from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq

    W = rng.standard_normal((8, 32))
    X = rng.standard_normal((32, 96))
    return quantize_weight_glvq(W, X @ X.T, spec=GLVQSpec(bits=2, d=4, group_size=16, n_iter=2,
                                                         encode="nearest_plane", mu=4.0), backend="numpy")


class Artifacts:
    """The pristine files, their regions, and how to load and compare each."""

    def __init__(self, root: Path, seed: int = 0):
        import torch

        from llm_adapter.calibration.checkpoints import check_manifest, model_identity, save_layer
        from llm_adapter.formats import export_gptq, save_quantized
        from llm_adapter.methods.uniform import QuantSpec, quantize_weight
        from tests.llm_fixtures import tiny_llama

        rng = np.random.default_rng([seed, 1017])
        self.root = root
        v1 = {"model.layers.0.mlp.up_proj": _uniform(rng, 8, 64, 4, 32),
              "model.layers.0.mlp.down_proj": _uniform(rng, 8, 64, 3, 64, perm=True)}
        v2 = {"model.layers.0.self_attn.q_proj": _uniform(rng, 8, 32, 2, 16), "model.layers.0.mlp.gate_proj": _glvq(rng)}
        self.saved = {"native_v1": v1, "native_v2": v2}
        save_quantized(root / "native_v1", v1, {"bits": 4, "method": "gptq"}, {"source": "fuzz"})
        save_quantized(root / "native_v2", v2, {"bits": 2, "method": "glvq"}, {"source": "fuzz"}, scale_dtype="float16")
        model = tiny_llama()
        glayers = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(("mlp.up_proj", "self_attn.q_proj")):
                glayers[name] = quantize_weight(mod.weight.detach().numpy().astype(np.float64),
                                                spec=QuantSpec(bits=4, group_size=32, method="rtn"))
        export_gptq(model, glayers, root / "gptq")
        (root / "ckpt").mkdir()
        self.layer = {"uniform": _uniform(rng, 8, 64, 4, 32, perm=True), "glvq": _glvq(rng)}
        for kind, layer in self.layer.items():
            save_layer(root / "ckpt" / f"model.layers.0.{kind}.npz", layer)
            save_layer(root / "ckpt" / f"model.layers.0.{kind}.safetensors", layer)
        self.manifest = {"spec": QuantSpec(bits=4, group_size=32).to_dict(), "seed": 0, "windows": [4, 64],
                         "windows_crc": 123, "layers": sorted(glayers), "model": model_identity(model)}
        check_manifest(root / "ckpt", self.manifest).release()
        self.reference = {"gptq": self._load_gptq()}
        for kind in ("uniform", "glvq"):
            for suffix in ("npz", "safetensors"):
                self.reference[f"{kind}.{suffix}"] = self.layer[kind]
        from llm_adapter.formats import load_quantized

        self.reference["native_v1"] = load_quantized(root / "native_v1")
        self.reference["native_v2"] = load_quantized(root / "native_v2")

        st = "quantized.safetensors"
        cfg = "quant_config.json"
        ck = root / "ckpt"
        self.files = {  # family -> (file, {region: [(lo, hi), ...]}, loader key)
            "native_v1": [(root / "native_v1" / st, "native_v1"), (root / "native_v1" / cfg, "native_v1")],
            "native_v2": [(root / "native_v2" / st, "native_v2"), (root / "native_v2" / cfg, "native_v2")],
            "gptq": [(root / "gptq" / "model.safetensors", "gptq"), (root / "gptq" / "config.json", "gptq")],
            "ckpt_npz_uniform": [(ck / "model.layers.0.uniform.npz", "uniform.npz")],
            "ckpt_npz_glvq": [(ck / "model.layers.0.glvq.npz", "glvq.npz")],
            "ckpt_st_uniform": [(ck / "model.layers.0.uniform.safetensors", "uniform.safetensors")],
            "ckpt_st_glvq": [(ck / "model.layers.0.glvq.safetensors", "glvq.safetensors")],
            "manifest": [(ck / "manifest.json", "manifest")],
        }
        self.targets = []  # (family, region, path, ranges, loader key)
        for family, files in self.files.items():
            for path, key in files:
                for region, ranges in _regions(path).items():
                    self.targets.append((f"{family}.{region}", path, ranges, key))
        self.pristine = {str(p): p.read_bytes() for files in self.files.values() for p, _ in files}

    def _load_gptq(self):
        from llm_adapter.formats.gptq import verify_gptq

        return verify_gptq(self.root / "gptq")

    def load_and_compare(self, key: str) -> bool:
        """Load with the library; True if equal to what was saved, False if different."""
        from llm_adapter.calibration.checkpoints import check_manifest, load_layer
        from llm_adapter.formats import load_quantized

        if key.startswith("native"):
            got = load_quantized(self.root / key)
            ref = self.reference[key]
            return _same_layers(got[0], ref[0]) and got[1] == ref[1]
        if key == "gptq":
            import torch

            config, tensors = self._load_gptq()
            rconfig, rtensors = self.reference["gptq"]
            return config == rconfig and set(tensors) == set(rtensors) and all(
                tensors[k].dtype == rtensors[k].dtype and torch.equal(tensors[k], rtensors[k]) for k in tensors)
        if key == "manifest":
            check_manifest(self.root / "ckpt", self.manifest).release()  # accepted only if equal
            return json.loads((self.root / "ckpt" / "manifest.json").read_text()) == self.manifest
        got = load_layer(self.root / "ckpt" / f"model.layers.0.{key}")
        return _same_layers({"l": got}, {"l": self.reference[key]})


def _same_layers(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    for name in a:
        x, y = a[name], b[name]
        if type(x) is not type(y) or x.metadata() != y.metadata():
            return False
        ax, ay = x.to_arrays(), y.to_arrays()
        if set(ax) != set(ay):
            return False
        for k in ax:
            u, v = np.asarray(ax[k]), np.asarray(ay[k])
            if u.dtype != v.dtype or u.shape != v.shape or not np.array_equal(u, v):
                return False
    return True


def _regions(path: Path) -> dict:
    """{region: [(lo, hi), ...]} byte ranges of `path`."""
    data = path.read_bytes()
    if path.suffix == ".json":
        return {"config": [(0, len(data))]}
    if path.suffix == ".safetensors":
        end = 8 + int.from_bytes(data[:8], "little")
        return {"header": [(0, end)], "tensor": [(end, len(data))]}
    regions = defaultdict(list)
    covered = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            lh = data[info.header_offset: info.header_offset + 30]
            start = info.header_offset + 30 + int.from_bytes(lh[26:28], "little") + int.from_bytes(lh[28:30], "little")
            rng = (start, start + info.compress_size)
            regions["meta" if info.filename == "meta.npy" else "tensor"].append(rng)
            covered.append(rng)
    covered.sort()
    pos, rest = 0, []
    for lo, hi in covered:
        if lo > pos:
            rest.append((pos, lo))
        pos = max(pos, hi)
    if pos < len(data):
        rest.append((pos, len(data)))
    regions["container"] = rest
    return dict(regions)


def _pick(rng, ranges):
    sizes = np.array([hi - lo for lo, hi in ranges], dtype=np.int64)
    k = int(rng.integers(0, sizes.sum()))
    for (lo, hi), s in zip(ranges, sizes):
        if k < s:
            return lo + k
        k -= s
    raise AssertionError


# ---------------------------------------------------------------------------- one case
def _named(err, path: Path) -> bool:
    msg = str(err)
    return path.name in msg or str(path.parent) in msg


def run_case(art: Artifacts, seed: int, timeout: float = 10.0):
    """Flip one byte (case `seed`), load, restore; returns (target, outcome, detail)."""
    from llm_adapter.errors import QuantizedFormatError

    rng = np.random.default_rng([seed, 77])
    target, path, ranges, key = art.targets[seed % len(art.targets)]
    pos = _pick(rng, ranges)
    mask = int(rng.integers(1, 256))
    original = art.pristine[str(path)]
    data = bytearray(original)
    data[pos] ^= mask
    path.write_bytes(bytes(data))
    detail = f"{path.name} byte {pos} ^ {mask:#04x}"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = art.load_and_compare(key)
        outcome = "correct" if same else "silent_wrong"
    except _Hang:
        outcome = "hang"
    except QuantizedFormatError as err:
        outcome = "clear_error" if _named(err, path) else "crash"
        if outcome == "crash":
            detail += f": {type(err).__name__} not naming the file: {err}"
    except Exception as err:  # noqa: BLE001 - classified, not hidden
        outcome = "crash"
        detail += f": {type(err).__name__}: {err}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        path.write_bytes(original)
        for junk in path.parent.glob(".lock"):
            junk.unlink()
    return target, outcome, detail


def _alarm(signum, frame):
    raise _Hang()


def fuzz(cases: int, *, seed: int = 0, timeout: float = 10.0, progress: bool = False) -> dict:
    """Run `cases` byte-flip cases; returns the summary (see the module docstring)."""
    counts: dict = defaultdict(Counter)
    examples: dict = defaultdict(list)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz_formats_") as tmp:
        art = Artifacts(Path(tmp), seed)
        for i in range(cases):
            target, outcome, detail = run_case(art, seed * 1_000_003 + i, timeout)
            counts[target][outcome] += 1
            if outcome not in ("clear_error", "correct") and len(examples[outcome]) < 10:
                examples[outcome].append(f"{target}: {detail}")
            if progress and (i + 1) % 1000 == 0:
                print(f"{i + 1}/{cases} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        targets = [t for t, *_ in art.targets]
    total = Counter()
    for c in counts.values():
        total.update(c)
    tensor = Counter()
    for t, c in counts.items():
        if t.endswith(".tensor"):
            tensor.update(c)
    n_tensor = sum(tensor.values())
    return {
        "cases": cases,
        "seed": seed,
        "timeout_s": timeout,
        "wall_s": round(time.perf_counter() - t0, 1),
        "totals": {o: total.get(o, 0) for o in OUTCOMES},
        "tensor_data": {"cases": n_tensor, "detected": tensor.get("clear_error", 0),
                        "detected_frac": (tensor.get("clear_error", 0) / n_tensor) if n_tensor else None},
        "by_target": {t: {o: counts[t].get(o, 0) for o in OUTCOMES} for t in targets},
        "examples": dict(examples),
    }


def _table(summary) -> str:
    lines = [f"{'target':32s} " + " ".join(f"{o:>12s}" for o in OUTCOMES)]
    for t, c in summary["by_target"].items():
        lines.append(f"{t:32s} " + " ".join(f"{c[o]:12d}" for o in OUTCOMES))
    lines.append(f"{'total':32s} " + " ".join(f"{summary['totals'][o]:12d}" for o in OUTCOMES))
    td = summary["tensor_data"]
    lines.append(f"tensor-data flips detected: {td['detected']}/{td['cases']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fuzz_formats.json"))
    args = ap.parse_args(argv)
    from _common import machine_info, write_atomically

    summary = fuzz(args.cases, seed=args.seed, timeout=args.timeout, progress=True)
    summary["machine"] = machine_info()
    summary["command"] = "python benchmarks/fuzz_formats.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_atomically(args.out, json.dumps(summary, indent=1) + "\n")
    print(_table(summary))
    print(f"wrote {args.out}")
    bad = summary["totals"]["silent_wrong"] + summary["totals"]["crash"] + summary["totals"]["hang"]
    return 1 if bad or summary["tensor_data"]["detected"] != summary["tensor_data"]["cases"] else 0


if __name__ == "__main__":
    sys.exit(main())

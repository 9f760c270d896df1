"""Issue #17, reproducers 11 and 12: calibration checkpoints and output directories.

* The manifest identifies the model and the spec: another model (or spec) on the same
  checkpoint directory is a ``CheckpointError`` naming both.
* A layer file of another bit width / shape is rejected; a truncated or corrupt one is an
  error naming the file.
* Thread and process races on one checkpoint directory or one ``--out``: exactly one run
  gets in, the others a clear error before any work.
* A kill between the two renames of an ``--overwrite`` replace: the next run restores the
  old directory; orphaned temporaries are removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_adapter.calibration import quantize_model
from llm_adapter.calibration.checkpoints import check_manifest, layer_path, load_layer, model_identity, save_layer
from llm_adapter.cli import main
from llm_adapter.errors import BusyError, CheckpointError
from llm_adapter.formats import claim_dir, load_quantized, save_quantized
from llm_adapter.formats._io import write_dir_atomically
from llm_adapter.methods.uniform import QuantSpec, quantize_weight
from tests.llm_fixtures import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
RTN4 = QuantSpec(bits=4, group_size=32, method="rtn")


def _windows():
    return torch.randint(2, 200, (2, 16), generator=torch.Generator().manual_seed(0))


class _Stop(Exception):
    pass


def _partial_run(ckpt, spec=RTN4, seed=0, n=3):
    """A run that stops after `n` layers (its checkpoints stay)."""
    done = []

    def stop(name, q):
        done.append(name)
        if len(done) == n:
            raise _Stop

    with pytest.raises(_Stop):
        quantize_model(tiny_llama(seed), _windows(), spec, progress=False, backend="numpy",
                       checkpoint_dir=ckpt, callback=stop)
    return done


def test_model_identity_is_recorded_and_another_model_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _partial_run(ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["model"] == model_identity(tiny_llama(0))
    assert manifest["spec"] == RTN4.to_dict()
    with pytest.raises(CheckpointError, match=r"holds layers of model .* but this run quantizes model") as info:
        quantize_model(tiny_llama(1), _windows(), RTN4, progress=False, checkpoint_dir=ckpt)
    msg = str(info.value)
    assert manifest["model"]["weights_sha256"][:12] in msg
    assert model_identity(tiny_llama(1))["weights_sha256"][:12] in msg
    assert info.value.param == "checkpoint_dir"
    # another spec on the same directory names both specs
    with pytest.raises(CheckpointError, match=r"spec .*'bits': 4.* but this run's spec is .*'bits': 3"):
        quantize_model(tiny_llama(0), _windows(), QuantSpec(bits=3, group_size=32, method="rtn"), progress=False,
                       checkpoint_dir=ckpt)
    # the right model resumes, and equals an uninterrupted run
    full = quantize_model(tiny_llama(0), _windows(), RTN4, progress=False)
    resumed = quantize_model(tiny_llama(0), _windows(), RTN4, progress=False, checkpoint_dir=ckpt)
    assert list(resumed) == list(full)
    for name in full:
        np.testing.assert_array_equal(resumed[name].codes, full[name].codes)


def test_cli_with_another_models_checkpoint_is_an_error(tmp_path, capsys):
    from tests.llm_fixtures import save_tiny

    a, b = save_tiny(tmp_path / "a"), save_tiny(tmp_path / "b", model=tiny_llama(1))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 60)
    args = ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--calib", str(text),
            "--calib-windows", "2", "--seqlen", "32", "--backend", "numpy", "--checkpoint", str(tmp_path / "ck")]
    assert main([*args, "--model", str(a), "--out", str(tmp_path / "qa")]) == 0
    capsys.readouterr()
    code = main([*args, "--model", str(b), "--out", str(tmp_path / "qb")])
    err = capsys.readouterr().err
    assert code == 2 and "--checkpoint" in err and "holds layers of model" in err and "this run quantizes" in err
    assert not (tmp_path / "qb").exists()


def test_a_layer_file_of_another_bit_width_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    done = _partial_run(ckpt)
    # a 3-bit layer file copied over one of the 4-bit run's
    other = tmp_path / "other"
    _partial_run(other, spec=QuantSpec(bits=3, group_size=32, method="rtn"))
    os.replace(layer_path(other, done[0]), layer_path(ckpt, done[0]))
    with pytest.raises(CheckpointError, match=r"was written with bits = 3, this run has bits = 4") as info:
        quantize_model(tiny_llama(0), _windows(), RTN4, progress=False, checkpoint_dir=ckpt)
    assert done[0] in str(info.value)


def test_load_layer_checks_spec_shape_and_method(tmp_path):
    W = np.random.default_rng(0).standard_normal((8, 64))
    p = save_layer(tmp_path / "fc.npz", quantize_weight(W, spec=RTN4))
    assert load_layer(p, spec=RTN4, shape=(8, 64)).bits == 4
    with pytest.raises(CheckpointError, match="group_size = 32, this run has group_size = -1"):
        load_layer(p, spec=QuantSpec(bits=4, method="rtn"))
    with pytest.raises(CheckpointError, match=r"shape \(8, 64\), the module has \(16, 64\)"):
        load_layer(p, spec=RTN4, shape=(16, 64))
    with pytest.raises(CheckpointError, match="made by method 'rtn', this run uses 'gptq'"):
        load_layer(p, spec=QuantSpec(bits=4, group_size=32, method="gptq"))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_truncated_or_corrupt_layer_files_name_the_file(tmp_path, suffix):
    W = np.random.default_rng(1).standard_normal((8, 64))
    q = quantize_weight(W, spec=RTN4)
    p = save_layer(tmp_path / f"model.layers.0.mlp.up_proj{suffix}", q)
    good = p.read_bytes()
    for cut in (0, 10, len(good) // 2, len(good) - 1):
        p.write_bytes(good[:cut])
        with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj") as info:
            load_layer(p)
        assert "delete it" in str(info.value) or "cannot be read" in str(info.value)
    rng = np.random.default_rng(2)
    for pos in rng.choice(len(good), size=150, replace=False):
        data = bytearray(good)
        data[pos] ^= int(rng.integers(1, 256))
        p.write_bytes(bytes(data))
        try:
            r = load_layer(p)
        except CheckpointError as err:
            assert p.name in str(err)
        else:  # a flip in zip/safetensors padding or the npz header's spaces
            assert all(np.array_equal(np.asarray(v), np.asarray(q.to_arrays()[k])) for k, v in r.to_arrays().items())


def test_truncated_layer_in_a_resumed_run_is_an_error_naming_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    done = _partial_run(ckpt)
    f = layer_path(ckpt, done[1])
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f.name.replace(".", r"\.")):
        quantize_model(tiny_llama(0), _windows(), RTN4, progress=False, checkpoint_dir=ckpt)


def test_old_checkpoint_files_without_checksums_still_load():
    from llm_adapter.errors import IntegrityWarning

    with pytest.warns(IntegrityWarning):
        q = load_layer(Path(__file__).parent / "data" / "saved_before_16" / "ckpt_uniform.npz")
    assert q.codes.ndim == 2


# ------------------------------------------------------------------ races
def test_thread_race_on_the_manifest_one_run_gets_in(tmp_path):
    ckpt = tmp_path / "ckpt"
    n = 6
    start, hold = threading.Barrier(n), threading.Barrier(n)
    results = [None] * n

    def run(i):
        start.wait()
        try:
            lock = check_manifest(ckpt, {"spec": {"bits": 2 + i % 3}, "seed": i})
            results[i] = "in"
        except CheckpointError as err:
            results[i] = err
            lock = None
        hold.wait()  # nobody leaves before every thread tried
        if lock is not None:
            lock.release()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("in") == 1, results
    for r in results:
        if r != "in":
            assert isinstance(r, CheckpointError) and "in use by another run" in str(r)
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json"]  # lock file gone, no temporaries


def test_thread_race_of_two_runs_with_different_specs(tmp_path):
    ckpt = tmp_path / "ckpt"
    gate = threading.Barrier(2)
    out = {}

    def run(bits):
        gate.wait()
        try:
            out[bits] = quantize_model(tiny_llama(0), _windows(), QuantSpec(bits=bits, group_size=32, method="rtn"),
                                       progress=False, checkpoint_dir=ckpt)
        except CheckpointError as err:
            out[bits] = err

    ts = [threading.Thread(target=run, args=(b,)) for b in (3, 4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    winners = [b for b, r in out.items() if isinstance(r, dict)]
    assert len(winners) == 1, out
    loser = ({3, 4} - set(winners)).pop()
    assert "in use by another run" in str(out[loser]) or "this run's spec" in str(out[loser])
    bits = {load_layer(p).bits for p in ckpt.glob("*.npz")}
    assert bits == {winners[0]}  # no mixing


_HOLDER = """
import os, sys, time
from llm_adapter.calibration.checkpoints import check_manifest
from llm_adapter.errors import CheckpointError
try:
    lock = check_manifest(sys.argv[1], {"spec": {"bits": int(sys.argv[2])}})
except CheckpointError as err:
    print("ERR", err, flush=True)
    sys.exit(3)
print("IN", flush=True)
while not os.path.exists(sys.argv[-1]):  # hold until every other process has tried
    time.sleep(0.05)
lock.release()
"""


_OUT_HOLDER = """
import os, sys, time
from llm_adapter.errors import BusyError
from llm_adapter.formats import claim_dir
try:
    lock = claim_dir(sys.argv[1])
except BusyError as err:
    print("ERR", err, flush=True)
    sys.exit(3)
print("IN", flush=True)
while not os.path.exists(sys.argv[-1]):  # hold until every other process has tried
    time.sleep(0.05)
lock.release()
"""


def _race(tmp_path, argvs):
    """Start one process per argv at once; the winner holds until the others have exited."""
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    go = tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", *argv, str(go)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    deadline = time.monotonic() + 180
    while sum(p.poll() is not None for p in procs) < len(procs) - 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    go.touch()
    return procs, [p.communicate(timeout=120) for p in procs]


def test_process_race_on_one_out_one_run_gets_in(tmp_path):
    procs, outs = _race(tmp_path, [[_OUT_HOLDER, str(tmp_path / "out")]] * 3)
    assert sorted(p.returncode for p in procs) == [0, 3, 3], outs
    assert sum("in use by another run" in out for out, _ in outs) == 2


def test_process_race_on_the_manifest_one_run_gets_in(tmp_path):
    ckpt = tmp_path / "ckpt"
    procs, outs = _race(tmp_path, [[_HOLDER, str(ckpt), str(b)] for b in (3, 4, 4)])
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 3, 3], outs
    for (out, _), code in zip(outs, codes):
        if code == 3:
            assert "in use by another run" in out or "this run's spec" in out, out


def test_same_out_from_two_runs_is_refused_before_work(tmp_path, capsys):
    out = tmp_path / "q"
    held = claim_dir(out)  # another run writing the same --out
    try:
        with pytest.raises(BusyError, match="in use by another run"):
            threading_result = []
            t = threading.Thread(target=lambda: threading_result.append(_try_claim(out)))
            t.start()
            t.join()
            raise threading_result[0]
    finally:
        held.release()
    # the CLI: the error names --out and comes before the model is even looked at
    held = claim_dir(out)
    try:
        t_out = []
        t = threading.Thread(target=lambda: t_out.append(main(["quantize", "--model", str(tmp_path / "no-model"),
                                                                "--out", str(out)])))
        t.start()
        t.join()
    finally:
        held.release()
    err = capsys.readouterr().err
    assert t_out == [2] and "--out" in err and "in use by another run" in err and "no-model" not in err


def _try_claim(path):
    try:
        claim_dir(path).release()
    except BusyError as err:
        return err
    return AssertionError("the second claim got in")


_KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from llm_adapter.formats import _io
real, calls = os.replace, []
def replace(a, b):
    calls.append((a, b))
    if len(calls) == 2:  # target already moved aside, new one not yet renamed in
        os._exit(9)
    return real(a, b)
_io.os.replace = replace
_io.write_dir_atomically(sys.argv[1], lambda p: (p / "v").write_text("new"), on_exists="replace")
"""


def test_kill_between_the_two_renames_of_overwrite_is_repaired(tmp_path):
    target = tmp_path / "out"
    write_dir_atomically(target, lambda p: (p / "v").write_text("old"))
    p = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(target)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    assert not target.exists()  # the half-finished swap
    assert any(q.name.startswith(".out.old-") for q in tmp_path.iterdir())
    claim_dir(target).release()  # the next run: repaired before any work
    assert (target / "v").read_text() == "old"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]  # no orphans, no lock file
    write_dir_atomically(target, lambda p: (p / "v").write_text("new"), on_exists="replace")
    assert (target / "v").read_text() == "new"


def test_native_overwrite_interrupted_then_cli_style_repair(tmp_path):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 64))
    q = quantize_weight(W, spec=RTN4)
    target = save_quantized(tmp_path / "q", {"m.a": q})
    # simulate the leftovers of a killed replace by hand: target moved aside, temporary new dir
    aside = tmp_path / ".q.old-abc"
    aside.mkdir()
    os.replace(target, aside / "dir")
    (tmp_path / ".q.tmp-def").mkdir()
    with claim_dir(target):
        pass
    layers, _ = load_quantized(target)
    np.testing.assert_array_equal(layers["m.a"].codes, q.codes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_orphaned_temporaries_in_a_checkpoint_dir_are_removed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    orphan = ckpt / ".model.layers.0.mlp.up_proj.npz.x1y2.tmp"
    orphan.write_bytes(b"half")
    check_manifest(ckpt, {"spec": {}}).release()
    assert not orphan.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json"]

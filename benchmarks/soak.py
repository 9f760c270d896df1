"""Kill-and-resume soak: SIGKILL a tiny-model quantization at random points, resume, compare.

Every trial starts ``python -m llm_adapter quantize ... --checkpoint DIR`` (the CLI only:
its flags are the stable interface), kills it with SIGKILL at a random point, then runs
the same command again on the same checkpoint directory. The resumed output must hold
byte-identical tensors to an uninterrupted run (same names, dtypes, shapes and bytes of
every tensor in the ``.safetensors`` files). If the killed run had already written its
``--out`` directory (written atomically), that one is compared too.

Kill points are drawn two ways, alternately: a uniform random delay (a third each over the
start-up and calibration, the layers, and the final write, timed on an uninterrupted
run), and "after the j-th checkpointed layer plus a random 0-30 ms" (j
uniform), so the points cover start-up, calibration, the layers and the final write.

Usage::

    python benchmarks/soak.py --points 20 [--seed 0]

writes ``benchmarks/results/soak.json`` (one record per point: delay, layers checkpointed
at the kill, whether the process was still running, identical or not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def make_inputs(directory):
    """The tiny random Llama of ``tests/llm_fixtures.py`` and a 4000-word calibration text."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from llm_fixtures import save_tiny

    model = save_tiny(os.path.join(directory, "model"))
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "doth", "speak", "and", "ere", "night", "falls", "we", "shall", "sleep"]
    text = os.path.join(directory, "corpus.txt")
    with open(text, "w") as f:
        f.write(" ".join(rng.choice(words, 4000)) + "\n")
    return str(model), text


def command(model, text, out, checkpoint):
    return [sys.executable, "-m", "llm_adapter", "quantize", "--model", model, "--method", "gptq",
            "--bits", "4", "--group-size", "32", "--calib", text, "--calib-windows", "4",
            "--seqlen", "64", "--backend", "numpy", "--out", out, "--checkpoint", checkpoint]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_to_end(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"quantize failed ({p.returncode}): {p.stderr[-2000:]}")
    return p


def tensors(out_dir):
    """{file/tensor name: (dtype, shape, bytes)} of every .safetensors file in ``out_dir``."""
    from safetensors.numpy import load_file

    got = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            for key, arr in load_file(os.path.join(out_dir, name)).items():
                got[f"{name}/{key}"] = (str(arr.dtype), tuple(arr.shape), arr.tobytes())
    return got


def timed_run(cmd, checkpoint, timeout=600):
    """Run ``cmd`` to the end; (total s, s to the first checkpointed layer, s to the last)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as errf:  # a file, not a pipe: the child never blocks
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=errf)
        t_first = t_all = None
        n_seen = 0
        while p.poll() is None and time.monotonic() - t0 < timeout:
            n = _layers_done(checkpoint)
            if n and t_first is None:
                t_first = time.monotonic() - t0
            if n > n_seen:
                n_seen, t_all = n, time.monotonic() - t0
            time.sleep(0.005)
        if p.poll() is None:
            p.kill()
        p.wait()
        errf.seek(0)
        err = errf.read()
    if p.returncode != 0:
        raise RuntimeError(f"quantize failed ({p.returncode}): {err[-2000:]}")
    total = time.monotonic() - t0
    return total, (t_first if t_first is not None else 0.0), (t_all if t_all is not None else total)


def _layers_done(checkpoint):
    try:
        return sum(1 for f in os.listdir(checkpoint) if f.endswith(".npz"))
    except FileNotFoundError:
        return 0


def kill_at(cmd, checkpoint, *, delay=None, after_layers=None, jitter=0.0, timeout=600):
    """Start ``cmd``, SIGKILL it at the chosen point; returns (alive at kill, layers done, s)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if after_layers is not None:
            while _layers_done(checkpoint) < after_layers and p.poll() is None:
                if time.monotonic() - t0 > timeout:
                    break
                time.sleep(0.005)
            time.sleep(jitter)
        else:
            end = t0 + delay
            while time.monotonic() < end and p.poll() is None:
                time.sleep(0.005)
        alive = p.poll() is None
        if alive:
            os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    return alive, _layers_done(checkpoint), time.monotonic() - t0


def soak(points=20, seed=0, workdir=None, log=print, max_attempts=None):
    """Run the soak; returns the summary dict (``identical`` counts the resumed runs that match)."""
    rng = np.random.default_rng(seed)
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="bils-soak-")
    try:
        model, text = make_inputs(workdir)
        ref_out = os.path.join(workdir, "ref_out")
        t_ref, t_first, t_all = timed_run(command(model, text, ref_out, os.path.join(workdir, "ref_ckpt")),
                                          os.path.join(workdir, "ref_ckpt"))
        n_layers = _layers_done(os.path.join(workdir, "ref_ckpt"))
        ref = tensors(ref_out)
        log(f"uninterrupted run: {t_ref:.1f} s, {n_layers} layers checkpointed between "
            f"{t_first:.1f} s and {t_all:.1f} s, {len(ref)} tensors")
        records = []
        attempt = 0
        max_attempts = max_attempts or 3 * points
        while sum(r["killed_while_running"] for r in records) < points and attempt < max_attempts:
            attempt += 1
            ck = os.path.join(workdir, f"ckpt{attempt}")
            out = os.path.join(workdir, f"out{attempt}")
            cmd = command(model, text, out, ck)
            if attempt % 2:
                # a third of the delays each over start-up and calibration, the layers,
                # and the final write
                phase = int(rng.integers(0, 3))
                lo_t, hi_t = [(0.0, t_first), (t_first, t_all + 0.05), (t_all, t_ref)][phase]
                delay = float(rng.uniform(lo_t, hi_t))
                alive, done, at = kill_at(cmd, ck, delay=delay)
                how = f"delay {delay:.2f} s"
            else:
                j = int(rng.integers(0, n_layers + 1))
                jitter = float(rng.uniform(0.0, 0.03))
                alive, done, at = kill_at(cmd, ck, after_layers=j, jitter=jitter)
                how = f"after {j} layers + {jitter * 1000:.0f} ms"
            rec = {"attempt": attempt, "how": how, "killed_at_s": round(at, 3),
                   "killed_while_running": alive, "layers_checkpointed": done}
            if os.path.isdir(out):  # the killed run finished its atomic write: check it too
                rec["killed_run_out_identical"] = tensors(out) == ref
            resumed = out + "_resumed"
            try:
                run_to_end(command(model, text, resumed, ck))
                rec["identical"] = tensors(resumed) == ref
            except Exception as exc:  # noqa: BLE001 - a failed resume is a soak failure
                rec["identical"] = False
                rec["error"] = str(exc)[-500:]
            records.append(rec)
            log(f"[{attempt}] {how}: killed {'while running' if alive else 'after exit'} with "
                f"{done}/{n_layers} layers checkpointed -> resume "
                f"{'identical' if rec['identical'] else 'DIFFERENT'}")
            shutil.rmtree(ck, ignore_errors=True)
            for d in (out, resumed):
                shutil.rmtree(d, ignore_errors=True)
        killed = [r for r in records if r["killed_while_running"]]
        return {
            "points": len(killed),
            "identical": sum(r["identical"] for r in killed),
            "all_trials_identical": all(r["identical"] for r in records)
            and all(r.get("killed_run_out_identical", True) for r in records),
            "uninterrupted_s": round(t_ref, 2),
            "first_layer_s": round(t_first, 2),
            "all_layers_s": round(t_all, 2),
            "layers": n_layers,
            "layers_checkpointed_at_kill": sorted(r["layers_checkpointed"] for r in killed),
            "records": records,
        }
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args(argv)
    from _common import machine_info, write_json

    t0 = time.perf_counter()
    summary = soak(args.points, args.seed)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["machine"] = machine_info()
    path = write_json(args.out, summary)
    print(f"{summary['identical']}/{summary['points']} kill points resumed byte-identical "
          f"({summary['seconds']} s); wrote {path}")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("records", "machine")}))
    return 0 if summary["identical"] == summary["points"] and summary["all_trials_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

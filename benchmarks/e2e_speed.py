"""End-to-end quantization speed against one forward pass of the decoder (issue #18).

Protocol (``benchmarks/llm_quality.py``'s, whose data helpers are reused): SmolLM2-135M
(float32, CPU), 128 random calibration windows x 512 tokens of the Shakespeare
calibration plays (seed 0), every linear layer of the decoder blocks, W3 g128 (glvq:
3 bits, group 128, its spec's other defaults), true-sequential, 8 windows per batch.

One run measures:

* the yardstick: one forward pass of the decoder blocks over the calibration tokens
  (block by block, the same batches; the embedding and the head are not included), and
  the time to bring the first block's inputs (the model up to block 0);
* for each method, the wall time of :func:`llm_adapter.calibration.quantize_model` from
  the float weights, as a ratio to the yardstick, with the stage profile of the run
  (:mod:`llm_adapter.calibration.profile`), and the peak resident memory (RSS, sampled
  every 20 ms) against the target: float model + 2 x the block activations of the
  calibration set (tokens x hidden size x 4 bytes) + 1 GiB;
* the perplexity on the evaluation windows (32 x 512; ``--no-ppl`` skips it), against the
  same configuration's row in ``benchmarks/results/llm_quality.json`` (docs/results.md).

The machine's load average is recorded with every figure (the 2-core machine is shared).
Results: ``benchmarks/results/e2e_speed.json`` (merged by run key).

Usage::

    python benchmarks/e2e_speed.py --threads 2                       # everything the issue asks for
    python benchmarks/e2e_speed.py --methods gptq --calib-windows 16 --no-ppl  # quick
    python benchmarks/e2e_speed.py --methods gptq --paths single capture  # against the pre-#18 path
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from _common import machine_info, write_json_file  # noqa: E402
from llm_quality import CONFIGS, make_spec  # noqa: E402  (the protocol's configs and method fields)
from llm_adapter.calibration import quantize_model  # noqa: E402
from llm_adapter.calibration.memory import fix_mmap_threshold, limit_arenas  # noqa: E402
from llm_adapter.calibration.blocks import find_blocks, first_block_inputs, run_block  # noqa: E402
from llm_adapter.calibration.profile import format_profile  # noqa: E402
from llm_adapter.data import calibration_windows, evaluation_windows, load_text  # noqa: E402
from llm_adapter.evaluate import perplexity  # noqa: E402
from llm_adapter.models import load_model  # noqa: E402

logger = logging.getLogger("e2e_speed")

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "e2e_speed.json"
QUALITY = ROOT / "benchmarks" / "results" / "llm_quality.json"
ALL_METHODS = ("rtn", "gptq", "ojbkq", "regcal", "glvq")
#: The issue's targets: quantize wall time / one forward pass of the decoder.
TARGETS = {"gptq": 1.5, "ojbkq": 2.5, "regcal": 2.5, "glvq": 3.0}
GiB = 2 ** 30


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; else the ru_maxrss high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples the RSS every `interval` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval=0.02):
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()

    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def cpu_seconds() -> float:
    """CPU seconds of this process so far, every thread (user + system): against the wall time,
    how much of the 2 cores a stage got on the shared machine (2 x wall on a quiet one)."""
    return time.process_time()


def spec_for(method, config):
    """The benchmark's spec of `method` at `config` (llm_quality's fields; glvq: bits and group size)."""
    return make_spec(config, method, {})


def forward_pass(model, windows, batch_size):
    """``(seconds to the first block's inputs, seconds of one pass of every block over all batches,
    CPU seconds of that pass)``."""
    _, blocks = find_blocks(model)
    home = next(blocks[0].parameters()).device
    with torch.no_grad():
        t0 = time.perf_counter()
        inps = first_block_inputs(model, blocks, windows, batch_size, home)
        t1 = time.perf_counter()
        hs = [h for h, _, _ in inps]
        run_block(blocks[0], hs[0], inps[0][1], inps[0][2])  # warm-up (one-time costs), not timed
        t1, c1 = time.perf_counter(), cpu_seconds()
        for block in blocks:
            hs = [run_block(block, h, r, k) for h, (_, r, k) in zip(hs, inps)]
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, cpu_seconds() - c1


def reference_ppl(config, method):
    """The perplexity of (config, method) in benchmarks/results/llm_quality.json, if any."""
    try:
        data = json.loads(QUALITY.read_text())
    except (OSError, ValueError):
        return None
    run = data.get("runs", {}).get(f"{config}/{method}")
    return None if run is None else run.get("ppl")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default="w3g128", choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=list(ALL_METHODS))
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the issue's machine: 2)")
    ap.add_argument("--paths", nargs="+", default=["single"], choices=["single", "capture"],
                    help="calibration paths to time: 'single' (the default single pass) and/or 'capture' "
                         "(single_pass=False: the capture passes before issue #18), each method in each")
    ap.add_argument("--no-ppl", dest="ppl", action="store_false",
                    help="skip the perplexities (default: each quantized model on 32 x 512 held-out windows, "
                         "against docs/results.md)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("-v", "--verbose", action="store_true", help="per-block profile lines")
    ap.add_argument("--malloc-arenas", type=int, default=2,
                    help="cap glibc's malloc arenas (as `llm-adapter` does; 0: leave the C library's default)")
    ap.add_argument("--mmap-threshold-mib", type=int, default=4,
                    help="fix glibc's mmap threshold (as `llm-adapter` does; 0: leave the dynamic threshold)")
    args = ap.parse_args(argv)
    if args.malloc_arenas:
        limit_arenas(args.malloc_arenas)
    if args.mmap_threshold_mib:
        fix_mmap_threshold(args.mmap_threshold_mib * 2 ** 20)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("llm_adapter").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    t_load = time.perf_counter() - t0
    calib = calibration_windows(tok, load_text("shakespeare", split="calibration"),
                                n_windows=args.calib_windows, seqlen=args.seqlen, seed=args.seed)
    evalw = evaluation_windows(tok, load_text("shakespeare", split="evaluation"),
                               n_windows=args.eval_windows, seqlen=args.seqlen) if args.ppl else None
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = model.config.hidden_size
    n_tok = calib.shape[0] * calib.shape[1]
    act_bytes = n_tok * hidden * 4
    target_bytes = model_bytes + 2 * act_bytes + GiB
    float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state_bytes = sum(v.numel() * v.element_size() for v in float_state.values())

    la = load_average()
    t_in, t_fwd, c_fwd = forward_pass(model, calib, args.batch_size)
    forward_pass_s = t_fwd
    logger.info("one forward pass of the decoder blocks over %d x %d tokens: %.1f s (first-block inputs %.1f s; "
                "load %s)", calib.shape[0], calib.shape[1], t_fwd, t_in, la)
    yard = {"seconds": t_fwd, "cpu_s": c_fwd, "first_block_inputs_s": t_in, "load_average": [la, load_average()]}

    protocol = {"model": args.model, "config": args.config, "calib_windows": args.calib_windows,
                "seqlen": args.seqlen, "seed": args.seed, "batch_size": args.batch_size,
                "threads": torch.get_num_threads(), "corpus": "shakespeare", "true_sequential": True,
                "malloc_arenas": args.malloc_arenas, "mmap_threshold_mib": args.mmap_threshold_mib}
    try:
        data = json.loads(args.out.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("protocol") != protocol:
        data = {"protocol": protocol, "runs": {}}
    data.update(machine=machine_info(), model_load_s=t_load, forward_pass=yard)
    for method, path in [(m, p) for m in args.methods for p in args.paths]:
        spec = spec_for(method, args.config)
        model.load_state_dict(float_state)
        report = {}
        la0 = load_average()
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), cpu_seconds()
            layers = quantize_model(model, calib, spec, batch_size=args.batch_size, seed=args.seed,
                                    backend=args.backend, progress=False, report=report,
                                    single_pass=path == "single")
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        prof = report["profile"]
        peak_quant = model_bytes + max(0, mem.peak - mem.start)
        run = {
            "method": method, "spec": spec.to_dict(), "path": path,
            "wall_s": wall, "cpu_s": cpu, "ratio": wall / forward_pass_s, "cpu_ratio": cpu / c_fwd,
            "target_ratio": TARGETS.get(method),
            "profile": prof, "n_layers": len(layers),
            "memory": {"rss_start_bytes": mem.start, "rss_peak_bytes": mem.peak,
                       "quantize_peak_bytes": peak_quant, "target_bytes": target_bytes,
                       "model_bytes": model_bytes, "calib_block_activation_bytes": act_bytes,
                       "harness_float_copy_bytes": state_bytes,
                       "within_target": peak_quant <= target_bytes},
            "load_average": [la0, load_average()],
            "forward_pass_s": forward_pass_s,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        msg = (f"{method} ({path}): {wall:.1f} s = {run['ratio']:.2f} x the forward pass (CPU {cpu:.1f} s = "
               f"{run['cpu_ratio']:.2f} x its {c_fwd:.1f} s)"
               + (f" (target {TARGETS[method]} x)" if method in TARGETS else "")
               + f"; peak memory {peak_quant / GiB:.2f} GiB (target {target_bytes / GiB:.2f} GiB); "
               f"load {run['load_average']}")
        if args.ppl:
            t1 = time.perf_counter()
            ppl = perplexity(model, evalw, progress=False).ppl
            ref = reference_ppl(args.config, method)
            run.update(ppl=ppl, eval_time_s=time.perf_counter() - t1, reference_ppl=ref,
                       ppl_rel_diff=None if ref is None else (ppl - ref) / ref)
            msg += f"; perplexity {ppl:.3f}" + ("" if ref is None else f" (docs/results.md {ref:.3f}, "
                                                                     f"{100 * (ppl - ref) / ref:+.2f} %)")
        logger.info(msg)
        print(format_profile(prof, per_block=args.verbose), flush=True)
        run["forward_pass"] = yard
        data["runs"][f"{method}/{path}"] = run
        write_json_file(args.out, data)  # after every run: a long one (glvq) killed keeps the others
    print(f"\none forward pass of the decoder: {forward_pass_s:.1f} s, CPU {c_fwd:.1f} s "
          f"(load average {yard['load_average'][0]})")
    print(f"{'run':<18}{'wall s':>9}{'ratio':>8}{'CPU ratio':>10}{'target':>8}{'peak GiB':>10}{'target GiB':>11}"
          f"{'ppl':>9}")
    for key, run in data["runs"].items():
        cr = run.get("cpu_ratio")
        print(f"{key:<18}{run['wall_s']:9.1f}{run['wall_s'] / run['forward_pass_s']:8.2f}"
              f"{'' if cr is None else f'{cr:.2f}':>10}"
              f"{run['target_ratio'] or '':>8}{run['memory']['quantize_peak_bytes'] / GiB:10.2f}"
              f"{run['memory']['target_bytes'] / GiB:11.2f}{run.get('ppl') or float('nan'):9.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""``llm-adapter quantize``: quantize a model's linear layers and save them."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from .. import methods
from ..distributed import ClusterLostError
from ..errors import ParameterError
from .argtypes import device, group_size, nonneg_float, positive_int
from .common import (LAYER_HEADER, CLIError, check_new_dir, layer_row, layer_table, load_model_or_fail,
                     load_text_or_fail, make_windows, model_source)

__all__ = ["add_parser", "run"]

_BITS = (2, 3, 4, 8)
_BACKENDS = ("auto", "numpy", "numba", "cupy")
_CONNECT_TIMEOUT = 60  # seconds to reach a scheduler

logger = logging.getLogger("llm_adapter.cli")


def add_parser(sub, common) -> None:
    """Add the ``quantize`` command to the subparsers `sub`; the method list and the
    method-specific options come from the registry."""
    from .main import model_args

    q = sub.add_parser("quantize", parents=[common], help="quantize a model's linear layers and save them",
                       description="Quantize the linear layers of the decoder blocks and save them "
                                   "(native format, optionally a GPTQ and/or a compressed-tensors checkpoint). "
                                   "A per-layer table is printed as the layers finish and stored in the "
                                   "output's quant_config.json under model.report.")
    model_args(q, quantized=False)
    described = "; ".join(f"{n} = {methods.get(n).description}" for n in methods.names() if methods.get(n).description)
    q.add_argument("--method", choices=methods.names(), default="gptq",
                   help=f"quantization method (default gptq): {described}")
    q.add_argument("--bits", type=int, choices=_BITS, default=4, help="code width (default 4)")
    q.add_argument("--group-size", type=group_size, default=128,
                   help="input columns per group, -1 for per-channel (default 128)")
    q.add_argument("--damp", type=nonneg_float, default=0.01, help="Hessian damping, fraction of mean diag (default 0.01)")
    q.add_argument("--calib", nargs="+", default=["shakespeare"], metavar="CORPUS_OR_FILE",
                   help="calibration text: a corpus name (shakespeare, wikitext2, c4) or text file(s)")
    seen = []
    for name in methods.names():
        add = methods.get(name).cli_options
        if add is not None and add not in seen:
            seen.append(add)
            add(q)
    q.add_argument("--calib-windows", type=positive_int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per calibration window (default 2048)")
    q.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    q.add_argument("--seed", type=int, default=0, help="seed of the windows and of sampling (default 0)")
    q.add_argument("--targets", nargs="+", default=["*"], metavar="PATTERN",
                   help="fnmatch patterns of the linear layers to quantize (default: all in the blocks)")
    q.add_argument("--out", metavar="DIR", default=None, help="write the quantized layers here (native format)")
    q.add_argument("--export-gptq", metavar="DIR", default=None, help="also write a GPTQ checkpoint here")
    q.add_argument("--export-compressed-tensors", metavar="DIR", default=None,
                   help="also write a compressed-tensors pack-quantized checkpoint here (the format vLLM loads)")
    q.add_argument("--gptq-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="GPTQ checkpoint format (default gptq = v1, stores zero - 1)")
    q.add_argument("--checkpoint", "--resume", dest="checkpoint", metavar="DIR", default=None,
                   help="per-layer checkpoints; rerunning with the same DIR resumes where it stopped")
    q.add_argument("--backend", choices=_BACKENDS, default="auto", help="bils solver backend (default auto)")
    q.add_argument("--device", type=device, default=None, metavar="{cpu,cuda,cuda:N}",
                   help="onload the decoder blocks one at a time to this device and compute the statistics "
                        "and solves there (the model stays in CPU memory; default: where the model is)")
    q.add_argument("--overwrite", action="store_true", help="replace existing --out / --export-gptq directories")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="solve the layers on the dask cluster of this scheduler (tcp://host:8786); "
                            "the forward passes stay here")
    where.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="solve the layers on a local dask cluster of N single-threaded worker processes")
    q.set_defaults(func=run)


def spec_from_args(args):
    """The spec of ``args.method`` from the parsed arguments; errors name the flag."""
    method = methods.get(args.method)
    try:
        return method.spec_from_cli(args)
    except ParameterError as err:
        raise CLIError(method.flag(err.param), str(err)) from err


def _worker_env(n_workers):
    """Each local worker's share of the cores for numba / OpenMP (unless set by the user):
    one dask thread per worker, its kernels parallel over the RHS on ``cores // N`` threads."""
    share = str(max(1, (os.cpu_count() or 1) // n_workers))
    return {var: os.environ.get(var, share) for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}


#: glibc's ``MALLOC_MMAP_THRESHOLD_`` for the ``--workers`` processes (bytes). distributed's
#: nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also turns off glibc's
#: sliding mmap threshold, so every solve's arrays above 128 KiB are fresh mappings paged in
#: again (docs/scaling_out.md: 19 000 -> 55 minor faults and 19 % less task CPU per
#: 10^6-RHS Babai run with 32 MiB, glibc's largest).
WORKER_MMAP_THRESHOLD = 32 * 2 ** 20


def _worker_malloc_config():
    """The dask config that gives local workers :data:`WORKER_MMAP_THRESHOLD` before they
    start (glibc reads it once, so it must be in the nanny's pre-spawn environment); empty
    when the user set ``MALLOC_MMAP_THRESHOLD_`` (the workers inherit it)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return {}
    return {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": WORKER_MMAP_THRESHOLD}


@contextlib.contextmanager
def _cluster(args):
    """The ``distributed.Client`` of ``--scheduler`` / ``--workers`` (None without them),
    closed (with the local cluster) on exit."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    flag = "--scheduler" if args.scheduler is not None else "--workers"
    try:
        import distributed
    except ImportError as err:
        raise CLIError(flag, "needs the `distributed` package: pip install 'bils[dask]'") from err
    cluster = client = None
    try:
        try:
            if args.scheduler is not None:
                client = distributed.Client(args.scheduler, timeout=_CONNECT_TIMEOUT)
            else:
                import dask

                with dask.config.set(_worker_malloc_config()):
                    cluster = distributed.LocalCluster(processes=True, n_workers=args.workers,
                                                       threads_per_worker=1, dashboard_address=None,
                                                       host="127.0.0.1", env=_worker_env(args.workers))
                client = distributed.Client(cluster, timeout=_CONNECT_TIMEOUT)
        except (OSError, TimeoutError, RuntimeError) as err:
            where = args.scheduler if args.scheduler is not None else f"a local cluster of {args.workers} workers"
            raise CLIError(flag, f"cannot connect to {where}: {type(err).__name__}: {err}") from err
        workers = len(client.scheduler_info().get("workers", {}))
        print(f"solving layers on {client.scheduler.address} ({workers} workers)", flush=True)
        yield client
    finally:
        for thing in (client, cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - a cluster that is already gone
                    logger.debug("closing %r failed", thing, exc_info=True)


def run(args) -> int:
    """Run ``quantize``; returns the exit status.

    The output directories are claimed (an exclusive lock next to each, see
    :func:`llm_adapter.formats._io.claim_dir`) before any work: a second run writing the same
    ``--out`` / ``--export-gptq`` stops at once with an error naming the path, and a
    replace (``--overwrite``) a killed run left half-done is repaired first.
    """
    from ..errors import BusyError
    from ..formats import claim_dir

    ct_dir = getattr(args, "export_compressed_tensors", None)
    if args.out is None and args.export_gptq is None and ct_dir is None:
        raise CLIError("--out", "give --out DIR, --export-gptq DIR and/or --export-compressed-tensors DIR, or the "
                                "result is lost")
    locks = []
    try:
        for path, flag in ((args.out, "--out"), (args.export_gptq, "--export-gptq"),
                           (ct_dir, "--export-compressed-tensors")):
            if path is not None:
                try:
                    locks.append(claim_dir(path))
                except BusyError as err:
                    raise CLIError(flag, str(err)) from err
                except OSError as err:  # e.g. the parent is not writable
                    raise CLIError(flag, f"cannot write {str(path)!r}: {err}") from err
        return _run(args)
    finally:
        for lock in reversed(locks):
            lock.release()


def _run(args) -> int:
    from ..calibration import quantize_model
    from ..data import calibration_windows

    ct_dir = getattr(args, "export_compressed_tensors", None)
    check_new_dir(args.out, "--out", args.overwrite)
    check_new_dir(args.export_gptq, "--export-gptq", args.overwrite)
    check_new_dir(ct_dir, "--export-compressed-tensors", args.overwrite)
    spec = spec_from_args(args)
    method = methods.get(args.method)
    if getattr(spec, "tune_norms", False) and args.export_gptq is None and ct_dir is None:
        raise CLIError("--tune-norms", "the tuned norm weights are written only by --export-gptq or "
                                       "--export-compressed-tensors (the native --out stores the quantized layers)")
    if method.format.kind != "uniform" and args.export_gptq is not None:
        raise CLIError("--export-gptq", f"{args.method} layers have no GPTQ layout; use --out (the native format)")
    if args.device is not None and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device", f"--device {args.device}: torch sees no CUDA device")
    if method.format.kind != "uniform" and ct_dir is not None:
        raise CLIError("--export-compressed-tensors",
                       f"{args.method} layers have no compressed-tensors layout; use --out (the native format)")
    text = load_text_or_fail(args.calib, "calibration", "--calib")
    source = model_source(args.model)
    t_load = time.perf_counter()
    model, tok = load_model_or_fail(source)
    t_load = time.perf_counter() - t_load
    windows = make_windows(calibration_windows, "--calib-windows/--seqlen", tok, text,
                           n_windows=args.calib_windows, seqlen=args.seqlen, seed=args.seed)
    print(f"quantizing {source} with {args.method}: {spec.describe()}, calibration {args.calib_windows} x "
          f"{args.seqlen} tokens", flush=True)
    t0 = time.perf_counter()
    flags = {"targets": "--targets", "checkpoint_dir": "--checkpoint", "device": "--device"}
    run_report = {}  # device figures of the run (peak memory)
    widths = (48, 10, 10, 8, 11, 9, 6, 7, 7)

    def line(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(line(LAYER_HEADER), flush=True)

    from tqdm.auto import tqdm

    def print_row(name, q):  # the per-layer table, as the layers finish (above the progress bar)
        tqdm.write(line(layer_row(name, q)))

    with _cluster(args) as client:
        try:
            layers = quantize_model(model, windows, spec, targets=tuple(args.targets), batch_size=args.batch_size,
                                    seed=args.seed, checkpoint_dir=args.checkpoint, backend=args.backend,
                                    rtn_calibrate=True, callback=print_row, device=args.device, report=run_report,
                                    client=client)
        except ParameterError as err:
            if err.param in flags:
                raise CLIError(flags[err.param], str(err)) from err
            raise
        except ClusterLostError as err:
            kept = (f"; the layers finished before it are in {args.checkpoint}: rerun with the same "
                    "--checkpoint to resume") if args.checkpoint else " (give --checkpoint DIR to keep finished layers)"
            print(f"llm-adapter quantize: error: {err}{kept}", file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - t0
    profile = run_report.get("profile")
    if profile is not None:
        profile["totals"]["model_load"] = t_load
    report = layer_table(layers)
    print(report)
    print(f"{len(layers)} layers quantized in {elapsed:.1f} s (model load {t_load:.1f} s)")
    if profile is not None and getattr(args, "verbose", 0):
        from ..calibration.profile import format_profile

        print(format_profile(profile, per_block=args.verbose > 1))
    if "peak_device_bytes" in run_report:
        print(f"peak memory on {run_report['device']}: {run_report['peak_device_bytes'] / 2**30:.2f} GiB")
    if all(hasattr(l, "storage_bits") for l in layers.values()):
        bits = sum(l.storage_bits() for l in layers.values())
        print(f"storage: {bits / sum(l.codes.size for l in layers.values()):.4f} bits per weight "
              "(codes + fp16 generators and scales)")
    model_info = {
        "source": source,
        "model_type": getattr(model.config, "model_type", None),
        "config": model.config.to_dict(),
        "calibration": {"text": list(args.calib), "windows": args.calib_windows, "seqlen": args.seqlen,
                        "seed": args.seed},
        # the per-layer table of this run (also printed as it went), and per-row values
        "report": {"table": report, "columns": list(LAYER_HEADER),
                   "rows": [list(layer_row(n, l)) for n, l in layers.items()], "seconds": elapsed,
                   "profile": profile},
    }
    if args.out is not None:
        from ..formats import save_quantized

        path = save_quantized(args.out, layers, spec.to_dict(), model_info, overwrite=args.overwrite)
        print(f"wrote {path}")
    if args.export_gptq is not None:
        from ..formats import GPTQExportError, export_gptq

        try:
            path = export_gptq(model, layers, args.export_gptq, tokenizer=tok, damp_percent=args.damp,
                               checkpoint_format=args.gptq_format, overwrite=args.overwrite)
        except GPTQExportError as err:
            raise CLIError("--export-gptq", str(err)) from err
        print(f"wrote GPTQ checkpoint {path}")
    if ct_dir is not None:
        from ..formats.compressed_tensors import CompressedTensorsExportError, export_compressed_tensors

        try:
            path = export_compressed_tensors(model, layers, ct_dir, tokenizer=tok, overwrite=args.overwrite)
        except CompressedTensorsExportError as err:
            raise CLIError("--export-compressed-tensors", str(err)) from err
        print(f"wrote compressed-tensors checkpoint {path}")
    return 0

"""Probe (issue #18): peak RSS over the start, minor page faults and CPU seconds of one
quantize_model run on SmolLM2 cut to its first `n_blocks` blocks, `n_windows` x 512 tokens.

Arguments: n_blocks n_windows {single,capture} method. Environment: ``WARM=1`` runs a tiny
quantization first (numba kernels loaded), ``TRIM=1`` keeps the driver's per-group
``malloc_trim`` (off by default here), glibc's ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_``
as they are, ``TAG`` labels the line.

Usage::

    WARM=1 python benchmarks/single_pass_memory.py 3 32 single gptq
    WARM=1 MALLOC_ARENA_MAX=2 python benchmarks/single_pass_memory.py 3 32 single gptq
"""
import sys, time, os, resource, torch, logging
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2e_speed import PeakRSS, spec_for, load_average
from llm_adapter.calibration import quantize_model
from llm_adapter.data import calibration_windows, load_text
from llm_adapter.models import load_model
torch.set_num_threads(2)
from llm_adapter.calibration import driver
if not os.environ.get("TRIM"):
    driver.trim_memory = lambda: False
nb, nw, path, meth = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
model, tok = load_model("smollm2-135m")
model.model.layers = model.model.layers[:nb]; model.config.num_hidden_layers = nb
calib = calibration_windows(tok, load_text("shakespeare", split="calibration"), n_windows=nw, seqlen=512, seed=0)
if os.environ.get("WARM"):
    import copy
    m2 = copy.deepcopy(model); m2.model.layers = m2.model.layers[:1]; m2.config.num_hidden_layers = 1
    quantize_model(m2, calib[:1, :64], spec_for(meth, "w3g128"), progress=False); del m2
    import gc; gc.collect()
r0 = resource.getrusage(resource.RUSAGE_SELF)
report = {}
with PeakRSS() as mem:
    t0 = time.perf_counter()
    quantize_model(model, calib, spec_for(meth, "w3g128"), progress=False, report=report, single_pass=path == "single")
    wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
tot = report["profile"]["totals"]
print(f"{os.environ.get('TAG','')} {meth} {path} blocks {nb} windows {nw}: wall {wall:.1f} s, peak-start {(mem.peak-mem.start)/2**30:.3f} GiB, "
      f"minflt {r1.ru_minflt-r0.ru_minflt}, cpu {r1.ru_utime-r0.ru_utime+r1.ru_stime-r0.ru_stime:.1f} s (sys {r1.ru_stime-r0.ru_stime:.1f}), "
      f"fwd {tot.get('forward_propagate',0)+tot.get('forward_capture',0):.1f} stats {tot['statistics']:.1f} solve {tot['solve']:.1f} load {load_average()}", flush=True)

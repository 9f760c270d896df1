"""Probe (issue #18): the single pass's lockstep forward against the plain forward, in CPU
seconds, wall seconds and minor page faults, on SmolLM2 cut to its first `n_blocks` blocks.

The single pass runs with its statistics and solves made no-ops (only the threads, the
hooks and the forward remain); the plain forward is ``e2e_speed.py``'s yardstick loop.
Two repetitions each, alternating. On the shared machine compare CPU seconds, not wall.

Usage::

    python benchmarks/single_pass_forward.py 3 32
    MALLOC_ARENA_MAX=2 python benchmarks/single_pass_forward.py 3 32
"""
import sys, time, os, resource, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2e_speed import spec_for, load_average
from llm_adapter.calibration import driver, quantize_model
from llm_adapter.calibration.blocks import find_blocks, first_block_inputs, run_block
from llm_adapter.data import calibration_windows, load_text
from llm_adapter.models import load_model
torch.set_num_threads(2)
nb, nw = int(sys.argv[1]), int(sys.argv[2])
model, tok = load_model("smollm2-135m")
model.model.layers = model.model.layers[:nb]; model.config.num_hidden_layers = nb
calib = calibration_windows(tok, load_text("shakespeare", split="calibration"), n_windows=nw, seqlen=512, seed=0)
# the single pass with statistics and solves made no-ops: only the lockstep forward remains
driver.LayerStatistics.add = lambda self, *a, **k: None
driver.LayerStatistics.mean = lambda self, n: (None, None)
driver._Run.finish_all = lambda self, items: None
driver.trim_memory = lambda: False
_, blocks = find_blocks(model)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime, r.ru_minflt
for rep in range(2):
    with torch.no_grad():
        inps = first_block_inputs(model, blocks, calib, 8, torch.device("cpu"))
        hs = [h for h, _, _ in inps]
        w0 = time.perf_counter(); c0, f0 = cpu()
        for block in blocks:
            hs = [run_block(block, h, r, k) for h, (_, r, k) in zip(hs, inps)]
        w1 = time.perf_counter(); c1, f1 = cpu()
    print(f"{os.environ.get('TAG','')} plain  forward: wall {w1-w0:.1f} cpu {c1-c0:.1f} minflt {f1-f0} load {load_average()}", flush=True)
    w0 = time.perf_counter(); c0, f0 = cpu()
    quantize_model(model, calib, spec_for("gptq", "w3g128"), progress=False)
    w1 = time.perf_counter(); c1, f1 = cpu()
    print(f"{os.environ.get('TAG','')} single forward: wall {w1-w0:.1f} cpu {c1-c0:.1f} minflt {f1-f0} load {load_average()}", flush=True)

"""Old vs new product of ``H`` (issue #18): codes and perplexity with ``gram="matmul"``
(the full float32 product, before) and ``gram="syrk"`` (the upper triangle by BLAS ssyrk,
the CPU default since), on SmolLM2 W3 g128.

Reduced protocol (e2e_speed.py's data): ``--calib-windows`` (default 32) random windows x 512
tokens of the calibration plays, seed 0; perplexity on the first 32 x 512 held-out windows.
Each method is quantized once with each product from the float weights; reported: the
fraction of codes that differ, the perplexities and their relative difference, and the
statistics seconds of each run (stage profile). Results: ``benchmarks/results/stats_gram.json``.

Usage::

    python benchmarks/stats_gram.py --methods gptq ojbkq --threads 2
    python benchmarks/stats_gram.py --methods gptq --runs matmul/bs4 --threads 2 --out benchmarks/results/stats_gram_control.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine_info, write_json_file  # noqa: E402
from e2e_speed import load_average, spec_for  # noqa: E402
from llm_adapter.calibration import driver, quantize_model  # noqa: E402
from llm_adapter.calibration.statistics import LayerStatistics  # noqa: E402
from llm_adapter.data import calibration_windows, evaluation_windows, load_text  # noqa: E402
from llm_adapter.evaluate import perplexity  # noqa: E402
from llm_adapter.models import load_model  # noqa: E402

logger = logging.getLogger("stats_gram")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["gptq", "ojbkq"])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", nargs="+", default=["matmul", "syrk"], choices=["matmul", "syrk", "matmul/bs4"],
                    help="'matmul/bs4': the old product with 4 windows per batch, a rounding-level change of the "
                         "old arithmetic (a control: how far perplexity moves by rounding alone)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stats_gram.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("llm_adapter").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, load_text("shakespeare", split="calibration"),
                                n_windows=args.calib_windows, seqlen=512, seed=0)
    evalw = evaluation_windows(tok, load_text("shakespeare", split="evaluation"), n_windows=32, seqlen=512)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"machine": machine_info(), "calib_windows": args.calib_windows, "runs": {}}
    for method in args.methods:
        spec = spec_for(method, "w3g128")
        codes = {}
        for gram in args.runs:
            bs = 4 if gram.endswith("/bs4") else 8
            model.load_state_dict(state)
            report, la = {}, load_average()

            def stats(*a, gram=gram.split("/")[0], **k):
                return LayerStatistics(*a, gram=gram, **k)

            t0 = time.perf_counter()
            with mock.patch.object(driver, "LayerStatistics", stats):
                layers = quantize_model(model, calib, spec, batch_size=bs, seed=0, progress=False, report=report)
            wall = time.perf_counter() - t0
            ppl = perplexity(model, evalw, progress=False).ppl
            codes[gram] = {n: np.asarray(q.codes) for n, q in layers.items()}
            out["runs"][f"{method}/{gram}"] = {"wall_s": wall, "ppl": ppl, "profile": report["profile"]["totals"],
                                               "load_average": [la, load_average()]}
            logger.info("%s %s: %.1f s (statistics %.1f s), ppl %.4f, load %s", method, gram, wall,
                        report["profile"]["totals"]["statistics"], ppl, la)
        if "matmul" in codes:
            for other in [r for r in args.runs if r != "matmul"]:
                differ = sum(int((codes["matmul"][n] != codes[other][n]).sum()) for n in codes[other])
                total = sum(c.size for c in codes[other].values())
                a, b = out["runs"][f"{method}/matmul"]["ppl"], out["runs"][f"{method}/{other}"]["ppl"]
                out["runs"][f"{method}/compare/{other}"] = {"codes_differ_frac": differ / total,
                                                            "ppl_rel_diff": (b - a) / a}
                logger.info("%s %s against matmul: %.4f %% of codes differ; perplexity %+.3f %%", method, other,
                            100 * differ / total, 100 * (b - a) / a)
        write_json_file(args.out, out)
    print(json.dumps({k: v for k, v in out["runs"].items() if "/compare" in k}, indent=1))


if __name__ == "__main__":
    main()

"""H by ssyrk vs the float32 matmul on real SmolLM2 layers (issue #18): relative error of H
against the float64 product, the fraction of gptq codes that differ, and each solution's
layer loss under the float64 H, next to a rounding-level control (the float32 matmul
summed over the batches in reverse order).

Layer inputs: block 0 of SmolLM2-135M (float) on ``--windows`` calibration windows x 512
tokens (seed 0), 8 windows per batch, captured at q_proj (576 wide) and down_proj (1536).

Usage::

    python benchmarks/stats_gram_layer.py --windows 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm_adapter import QuantSpec  # noqa: E402
from llm_adapter.calibration.statistics import LayerStatistics  # noqa: E402
from llm_adapter.data import calibration_windows, load_text  # noqa: E402
from llm_adapter.methods import get as get_method  # noqa: E402
from llm_adapter.models import load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, load_text("shakespeare", split="calibration"), n_windows=args.windows,
                                seqlen=512, seed=0)
    block = model.model.layers[0]
    names = {"q_proj": block.self_attn.q_proj, "down_proj": block.mlp.down_proj}
    seen = {n: [] for n in names}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
             for n, m in names.items()]
    with torch.no_grad():
        for b in range(0, args.windows, 8):
            model.model(calib[b:b + 8])  # the hooks keep every block-0 layer input (later blocks: unused)
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in seen.items():
        width = xs[0].shape[-1]
        n_tok = sum(x.shape[0] * x.shape[1] for x in xs)
        X = torch.cat([x.reshape(-1, width) for x in xs]).double()
        H64 = (X.T @ X / n_tok).numpy()
        Hs = {}
        for label, gram, order in (("matmul", "matmul", xs), ("syrk", "syrk", xs), ("matmul_reversed", "matmul", xs[::-1])):
            st = LayerStatistics(width, joint=False, gram=gram)
            for x in order:
                st.add(x)
            Hs[label] = st.mean(n_tok)[0]
        W = names[n].weight.detach().float().numpy()
        spec = QuantSpec(bits=3, group_size=128, method="gptq")
        method = get_method("gptq")
        res = {}
        for label, H in Hs.items():
            q = method.quantize(W, H, None, spec, backend="auto", rng=np.random.default_rng(0))
            E = q.dequantize().astype(np.float64) - W
            res[label] = {"H_rel_err": float(np.linalg.norm(H - H64) / np.linalg.norm(H64)),
                          "loss_H64": float(np.einsum("ij,jk,ik->", E, H64, E)), "codes": np.asarray(q.codes)}
        ref = res["matmul"]["codes"]
        out[n] = {lab: {"H_rel_err": r["H_rel_err"], "loss_H64": r["loss_H64"],
                        "codes_differ_vs_matmul": float((r["codes"] != ref).mean())} for lab, r in res.items()}
        print(n, json.dumps(out[n], indent=1), flush=True)
    path = ROOT / "benchmarks" / "results" / "stats_gram_layer.json"
    path.write_text(json.dumps({"windows": args.windows, "layers": out}, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

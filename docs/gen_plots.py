"""Plots for the docs site from the benchmark results (``make docs`` runs this first).

Reads whatever exists of ``benchmarks/results/*.json`` and writes PNGs to ``docs/img/``
(``--out`` to change), one per question:

==================  =====================================  ===============================
file                question                                from
==================  =====================================  ===============================
solver_cost.png     solver cost relative to the optimum     solver_quality.json
klein_tau.png       Klein temperature vs the LLS rule        solver_quality.json
solver_speed.png    time vs problem size, per backend        cpu_solvers.json, gpu_solvers.json
                                                            (else solver_quality.json timings)
llm_ppl.png         perplexity vs bits, per method           llm_quality.json, lattice_quality.json
kernel_latency.png  quantized-matmul latency vs batch        gpu_kernels.json
==================  =====================================  ===============================

A missing file, or one whose layout this script does not recognise, is skipped with a
note on stdout (the docs page then says the plot is not built); the script never fails
because of the data. The readers are deliberately tolerant: benchmark scripts are
written by different people and record rows as lists of flat dicts under ``records``,
``results``, ``rows`` or ``runs`` (a list or a dict of rows), with a time in ``time_s``,
``seconds``, ``median_s``, ``time_ms``, ``latency_us``, ...

Usage::

    python docs/gen_plots.py [--results benchmarks/results] [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"

#: Time fields (name, factor to seconds), in order of preference.
TIME_KEYS = (("time_s", 1.0), ("median_s", 1.0), ("seconds", 1.0), ("wall_s", 1.0),
             ("mean_s", 1.0), ("time", 1.0), ("elapsed_s", 1.0), ("time_ms", 1e-3),
             ("median_ms", 1e-3), ("latency_ms", 1e-3), ("ms", 1e-3), ("time_us", 1e-6),
             ("latency_us", 1e-6), ("median_us", 1e-6), ("us", 1e-6))
#: Batch (tokens per matmul) fields of kernel benchmarks.
BATCH_KEYS = ("batch", "batch_size", "m", "tokens", "n_tokens", "M", "rows")
#: Problem-size fields of solver benchmarks (first one that varies is the x axis).
SIZE_KEYS = ("n", "k", "rhs", "n_rhs", "size", "m")


def note(msg: str) -> None:
    print(f"gen_plots: {msg}")


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        note(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} not found: skipped")
    except (OSError, ValueError) as exc:
        note(f"{path.name} unreadable ({exc}): skipped")
    return None


def rows_of(data) -> list[dict]:
    """Flat row dicts from a benchmark JSON, wherever they are."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if not isinstance(data, dict):
        return []
    for key in ("records", "results", "rows", "runs", "layers", "shapes", "data", "benchmarks",
                "measurements"):
        val = data.get(key)
        if isinstance(val, list):
            return [r for r in val if isinstance(r, dict)]
        if isinstance(val, dict) and val and all(isinstance(v, dict) for v in val.values()):
            return [{"key": k, **v} for k, v in val.items()]
    return []


def time_of(row: dict) -> float | None:
    for key, factor in TIME_KEYS:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v) * factor
        if isinstance(v, dict):  # e.g. {"median": .., "min": ..}
            for sub in ("median", "mean", "min"):
                w = v.get(sub)
                if isinstance(w, (int, float)) and math.isfinite(w) and w > 0:
                    return float(w) * factor
    return None


def num(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9,
                         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def plain_log_axis(axis) -> None:
    """Log axis labelled 1, 1.5, 2, 3 ... instead of 10^0, 2x10^0 (costs near 1); fewer
    ticks when the data span decades. Call after plotting."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    lo, hi = axis.get_view_interval()
    decades = math.log10(max(hi, 1e-300) / max(lo, 1e-300)) if lo > 0 else 10
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 1.2 else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def save(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)
    note(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
         f"({path.stat().st_size // 1024} kB)")
    return path


# ----------------------------------------------------------------------------- solver quality
_SOLVER = re.compile(r"^(?P<name>.*?)\s*\[(?P<order>[^\]]+)\]\s*$")


def _split_solver(label: str) -> tuple[str, str]:
    m = _SOLVER.match(label)
    return (m.group("name"), m.group("order")) if m else (label, "")


def plot_solver_cost(results: Path, out: Path) -> list[Path]:
    data = load(results / "solver_quality.json")
    rows = [r for r in rows_of(data) if num(r.get("mean_cost_over_ref")) is not None and "solver" in r]
    if not rows:
        if data is not None:
            note("solver_quality.json has no rows with `solver` and `mean_cost_over_ref`: skipped")
        return []
    plt = pyplot()
    written = []

    def problem(r):
        return (str(r.get("conditioning", "")), r.get("n", 0) or 0, r.get("levels", 0) or 0)

    problems = sorted({problem(r) for r in rows}, key=lambda p: (p[0] != "well", p[1], p[2]))
    orders = sorted({_split_solver(r["solver"])[1] for r in rows} - {""}) or [""]
    # The solver families, without the temperature study variants.
    names = []
    for r in rows:
        name, _ = _split_solver(r["solver"])
        if "tau=" in name or name == "enumerate" or name in names:
            continue
        names.append(name)
    fig, axes = plt.subplots(1, len(orders), figsize=(5.2 * len(orders), 3.6), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(names))
    cmap = plt.get_cmap("tab10")
    for ax, order in zip(axes[0], orders):
        for i, name in enumerate(names):
            label = f"{name} [{order}]" if order else name
            ys = []
            for p in problems:
                vals = [r["mean_cost_over_ref"] for r in rows if problem(r) == p and r["solver"] == label]
                ys.append(vals[0] if vals else float("nan"))
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(problems))]
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=name, color=cmap(i))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(problems)))
        ax.set_xticklabels([f"{c}\nn={n}\n{lv} lv" for c, n, lv in problems], fontsize=7)
        ax.set_title(f"ordering: {order}" if order else "solvers")
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    axes[0][0].set_ylabel("mean cost / optimum (1 = optimal)")
    axes[0][-1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Solver cost relative to the optimum (random BILS problems, 16 RHS each)", fontsize=10)
    written.append(save(fig, out, "solver_cost"))
    plt.close(fig)

    # Klein temperature: multiples of the LLS rule, V-BLAST order, S=32.
    tau_re = re.compile(r"tau=([\d.]+)xLLS")
    series = defaultdict(dict)
    for r in rows:
        name, order = _split_solver(r["solver"])
        if not name.startswith("klein"):
            continue
        m = tau_re.search(name)
        base = tau_re.sub("", name).strip()
        mult = float(m.group(1)) if m else 1.0
        series[(base, order)].setdefault(problem(r), {})[mult] = r["mean_cost_over_ref"]
    series = {k: v for k, v in series.items() if any(len(d) > 1 for d in v.values())}
    if series:
        from matplotlib.ticker import FuncFormatter

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for (base, order), per_problem in series.items():
            for p, d in sorted(per_problem.items(), key=lambda kv: (kv[0][0] != "well", kv[0][1], kv[0][2])):
                mults = sorted(d)
                ax.plot(mults, [d[x] for x in mults], marker="o", ms=3, lw=1, alpha=0.7,
                        label=f"{p[0]} n={p[1]} {p[2]} lv")
            allm = sorted({x for d in per_problem.values() for x in d})
            mean = [sum(d[x] for d in per_problem.values() if x in d) /
                    max(1, sum(1 for d in per_problem.values() if x in d)) for x in allm]
            ax.plot(allm, mean, color="k", lw=2.2, marker="s", label=f"mean ({base} [{order}])")
        ax.axvline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_xlabel("τ / Liu–Ling–Stehlé rule  (1 = default tau=\"auto\")")
        ax.set_ylabel("mean cost / optimum")
        ax.set_title("Klein temperature", fontsize=10)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(save(fig, out, "klein_tau"))
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------- solver speed
#: Backend names recognised inside wide timing keys (``babai_numba_s``).
BACKENDS = ("numba", "numpy", "cupy", "gpu", "cuda", "torch")
#: ``*_s`` fields of wide records that are not solver timings.
NOT_SOLVER_TIMES = {"build_s", "construct_s", "eval_time_s", "quant_time_s", "batch_s"}


def _long_rows(data, source: str) -> list[dict]:
    """Speed rows ``{solver, backend, size..., t}`` from a benchmark JSON, long or wide.

    Long: one row per (solver, backend, size) with a time field (solver_quality.json).
    Wide: one row per problem with a time column per solver/backend, e.g.
    ``{"n": 4096, "k": 4096, "babai_numba_s": .., "babai_numpy_s": .., "gptq_lean_s": ..}``
    (cpu_solvers.json ``layers``).
    """
    default_backend = data.get("backend") if isinstance(data, dict) else None
    if default_backend is None and source.startswith("gpu"):
        default_backend = "cupy"
    out = []
    for r in rows_of(data):
        sizes = {k: r[k] for k in SIZE_KEYS if num(r.get(k)) is not None}
        solver = r.get("solver") or r.get("name") or r.get("method")
        t = time_of(r)
        if isinstance(solver, str) and t is not None:
            if "tau=" in solver:
                continue
            out.append({**sizes, "solver": _split_solver(solver)[0],
                        "backend": str(r.get("backend") or default_backend or "?"), "t": t,
                        "source": source})
            continue
        for key, val in r.items():
            if not key.endswith("_s") or key in NOT_SOLVER_TIMES or num(val) is None or val <= 0:
                continue
            tokens = key[:-2].split("_")
            backend = next((tk for tk in tokens if tk in BACKENDS), None)
            name = " ".join(tk for tk in tokens if tk != backend)
            name = re.sub(r"^klein(\d+)", r"klein S=\1", name)
            name = re.sub(r"^kbest(\d+)", r"kbest K=\1", name)
            name = re.sub(r"^babai(\d+)$", r"babai \1-bit", name)
            if backend is None:
                backend = "torch" if name.startswith("gptq") else (default_backend or "?")
            out.append({**sizes, "solver": name, "backend": backend, "t": float(val), "source": source})
    return out


def _speed_rows(results: Path) -> list[dict]:
    out = []
    for path in sorted(results.glob("*.json")):
        if not (path.name.startswith(("cpu_solvers", "gpu_solvers")) or path.name == "solver_quality.json"):
            continue
        data = load(path)
        if data is not None:
            out += _long_rows(data, path.name)
    return out


def _family(solver: str) -> str:
    m = re.match(r"[A-Za-z]+", solver)
    return m.group(0).lower() if m else solver


def plot_solver_speed(results: Path, out: Path) -> list[Path]:
    rows = _speed_rows(results)
    dedicated = [r for r in rows if r["source"] != "solver_quality.json"]
    if dedicated:
        rows = dedicated
    if not rows:
        note("no solver timings (cpu_solvers.json / gpu_solvers.json / solver_quality.json): "
             "solver_speed skipped")
        return []
    for r in rows:  # x: the problem size, n*k when both are recorded and vary
        r["nk"] = r["n"] * r["k"] if num(r.get("n")) is not None and num(r.get("k")) is not None else None
    xkey = None
    for key in ("nk",) + SIZE_KEYS:
        if len({num(r.get(key)) for r in rows} - {None}) > 1:
            xkey = key
            break
    if xkey is None:
        note("solver timings do not vary in a size field: solver_speed skipped")
        return []
    xlabel = "problem size n·k (coordinates × right-hand sides)" if xkey == "nk" else xkey
    rows = [r for r in rows if num(r.get(xkey)) is not None]
    families = list(dict.fromkeys(_family(r["solver"]) for r in rows))
    plt = pyplot()
    ncol = min(len(families), 3)
    nrow = -(-len(families) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.0 * nrow), squeeze=False, sharey=True)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: plt.get_cmap("tab10")(i) for i, b in enumerate(backends)}
    for ax, fam in zip(axes.flat, families):
        series = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if _family(r["solver"]) == fam:
                series[(r["solver"], r["backend"])][num(r[xkey])].append(r["t"])
        for i, ((solver, backend), pts) in enumerate(sorted(series.items())):
            xs = sorted(pts)
            ys = [sorted(pts[x])[len(pts[x]) // 2] for x in xs]  # median over other settings
            ax.plot(xs, ys, marker="os^vD<>"[i % 7], color=colors[backend], ms=4,
                    ls=["-", "--", ":", "-."][i % 4] if len(series) > len(backends) else "-",
                    label=f"{solver} [{backend}]")
        ax.set_title(fam, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("time (s)")
    sources = ", ".join(sorted({r["source"] for r in rows}))
    fig.suptitle(f"Solver time vs problem size, per backend ({sources})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = save(fig, out, "solver_speed")
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------- LLM perplexity
def _bits_of(r: dict) -> float | None:
    for src in (r, r.get("spec") if isinstance(r.get("spec"), dict) else {}):
        b = num(src.get("bits")) if isinstance(src, dict) else None
        if b is not None:
            return b
    m = re.search(r"w(\d+)", str(r.get("config", r.get("key", ""))))
    return float(m.group(1)) if m else None


def _group_of(r: dict) -> str:
    spec = r.get("spec") if isinstance(r.get("spec"), dict) else {}
    g = spec.get("group_size", r.get("group_size"))
    if g is None:
        m = re.search(r"g(\d+)|(pc)", str(r.get("config", r.get("key", ""))))
        if m:
            return f"g{m.group(1)}" if m.group(1) else "per-channel"
        return "?"
    return "per-channel" if g == -1 else f"g{g}"


def _lattice_rows(results: Path) -> list[tuple[str, str, float, float]]:
    """(method, label, bits per weight incl. overhead, ppl) from lattice_quality.json."""
    path = results / "lattice_quality.json"
    if not path.exists():
        return []
    out = []
    for r in rows_of(load(path)):
        ppl, bpw = num(r.get("ppl")), num(r.get("bits_per_weight"))
        kind = r.get("kind") or r.get("method")
        if ppl is None or bpw is None or not isinstance(kind, str):
            continue
        out.append((kind, str(r.get("protocol", "")), bpw, ppl))
    return out


def plot_llm_ppl(results: Path, out: Path) -> list[Path]:
    data = load(results / "llm_quality.json")
    rows = []
    for r in rows_of(data) if data is not None else []:
        ppl, bits, method = num(r.get("ppl")), _bits_of(r), r.get("method")
        if ppl is None or bits is None or not isinstance(method, str) or r.get("overrides"):
            continue
        rows.append((method, _group_of(r), bits, ppl))
    lattice = _lattice_rows(results)
    if not rows and not lattice:
        if data is not None:
            note("llm_quality.json has no finished runs yet: llm_ppl skipped")
        return []
    plt = pyplot()
    panels = [p for p in (("llm", rows), ("lattice", lattice)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    lines = ["-", "--", ":", "-."]
    for ax, (kind, prow) in zip(axes[0], panels):
        methods = list(dict.fromkeys(m for m, *_ in prow))
        groups = sorted({g for _, g, *_ in prow}, key=lambda g: (g == "per-channel", g))
        for i, m in enumerate(methods):
            for j, g in enumerate(groups):
                pts = sorted((b, p) for mm, gg, b, p in prow if mm == m and gg == g)
                if pts:
                    ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", color=cmap(i),
                            ls=lines[j % len(lines)], label=f"{m} {g}".strip())
        fl = num((data.get("float") or {}).get("ppl")) if isinstance(data, dict) else None
        if fl is not None:
            ax.axhline(fl, color="k", lw=0.8, ls="--", label=f"float ({fl:.1f})")
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        if kind == "llm":
            ax.set_xlabel("code bits per weight")
            ax.set_xticks(sorted({b for *_, b, _ in prow}))
            model = (data.get("protocol") or {}).get("model", "") if isinstance(data, dict) else ""
            ax.set_title(f"Perplexity vs bits per method{(' — ' + model) if model else ''}\n"
                         "(llm_quality.json)", fontsize=9)
        else:
            ax.set_xlabel("stored bits per weight (codes + scales + generators)")
            ax.set_title("Uniform grid vs lattice VQ (lattice_quality.json)", fontsize=9)
        ax.set_ylabel("perplexity (log scale)")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = save(fig, out, "llm_ppl")
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------- kernel latency
def plot_kernel_latency(results: Path, out: Path) -> list[Path]:
    paths = sorted(results.glob("gpu_kernels*.json"))
    if not paths:
        note("gpu_kernels.json not found (written by benchmarks/gpu_kernels.py on a GPU): skipped")
        return []
    rows = []
    for path in paths:
        for r in rows_of(load(path)):
            t = time_of(r)
            batch = next((num(r.get(k)) for k in BATCH_KEYS if num(r.get(k)) is not None), None)
            if t is None or batch is None:
                continue
            parts = [str(r[k]) for k in ("kernel", "name", "impl", "method", "format") if isinstance(r.get(k), str)]
            if r.get("bits") is not None:
                parts.append(f"W{r['bits']}")
            for k in ("group_size", "shape", "layer"):
                if r.get(k) is not None:
                    parts.append(f"{k}={r[k]}")
            rows.append((" ".join(dict.fromkeys(parts)) or "kernel", batch, t))
    if not rows:
        note("gpu_kernels.json: no rows with a batch size and a time: skipped")
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    series = defaultdict(lambda: defaultdict(list))
    for label, b, t in rows:
        series[label][b].append(t)
    for i, (label, pts) in enumerate(sorted(series.items())):
        xs = sorted(pts)
        ax.plot(xs, [1e6 * min(pts[x]) for x in xs], marker="os^vD<>"[i % 7], ms=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (tokens per matmul)")
    ax.set_ylabel("latency (µs)")
    ax.set_title("Quantized matmul latency vs batch", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = save(fig, out, "kernel_latency")
    plt.close(fig)
    return [path]


PLOT_NAMES = ("solver_cost", "klein_tau", "solver_speed", "llm_ppl", "kernel_latency")
PLOTTERS = (plot_solver_cost, plot_solver_speed, plot_llm_ppl, plot_kernel_latency)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="benchmark JSON folder")
    ap.add_argument("--out", type=Path, default=OUT, help="where the PNGs go")
    args = ap.parse_args(argv)
    try:
        pyplot()
    except ImportError:
        note("matplotlib is not installed (pip install -e '.[docs]'): no plots")
        return 0
    for name in PLOT_NAMES:  # no stale image survives its data
        (args.out / f"{name}.png").unlink(missing_ok=True)
    written = []
    for plotter in PLOTTERS:
        try:
            written += plotter(args.results, args.out)
        except Exception as exc:  # noqa: BLE001 - data written by others must not break the docs
            note(f"{plotter.__name__} failed on the data ({type(exc).__name__}: {exc}): skipped")
    note(f"{len(written)} plot(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

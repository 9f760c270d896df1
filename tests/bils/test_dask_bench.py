"""benchmarks/dask_scaling.py: the interleaved measurement behind the 1 vs 2 worker target.

The statistics helpers are checked on known numbers; the interleaving on two in-process
clusters (threads: no worker processes to start); and one tiny run of the whole ``rhs``
part on two process clusters, which checks every cluster result against the in-memory
solve as it goes and must record min, median, spread and the load of every round.
"""

import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
TIMEOUT = 120


@pytest.fixture(scope="module")
def ds():
    spec = importlib.util.spec_from_file_location("dask_scaling_under_test", BENCH / "dask_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    path, threads = list(sys.path), os.environ.get("NUMBA_NUM_THREADS")
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path  # the script edits sys.path for itself
        # and sets NUMBA_NUM_THREADS=1 for its own process: numba rereads it when it
        # compiles, so it must not leak into the other tests' process
        if threads is None:
            os.environ.pop("NUMBA_NUM_THREADS", None)
        else:
            os.environ["NUMBA_NUM_THREADS"] = threads
    return mod


def test_summary_of_known_times(ds):
    s = ds.summary([0.5, 0.1, 0.4, 0.2, 0.3])
    assert s["n"] == 5
    assert (s["min_s"], s["q1_s"], s["median_s"], s["q3_s"], s["max_s"]) == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5))
    assert s["iqr_over_median"] == pytest.approx(0.2 / 0.3)
    assert ds.summary([0.25])["iqr_over_median"] == 0.0


def test_record_runs_keeps_min_stats_cpu_and_tasks(ds):
    e = {}
    g = {"times": [0.4, 0.2, 0.6], "cpu": [{"worker0": 0.3}, {"worker0": 0.1, "client+scheduler": 0.03},
                                       {"worker0": 0.2}],
         "stream": [object()] * 12}
    ds.record_runs(e, "fused", 1, g, per=2)
    assert e["fused_workers1_s"] == pytest.approx(0.1)  # the minimum, per batch
    assert e["fused_runs_workers1_s"] == pytest.approx([0.2, 0.1, 0.3])
    assert e["fused_stats_workers1"]["median_s"] == pytest.approx(0.2)
    assert e["fused_cpu_workers1_s"] == pytest.approx({"worker0": 0.1, "client+scheduler": 0.005})
    assert e["fused_tasks_per_run_workers1"] == 2.0


@pytest.fixture(scope="module")
def thread_clusters():
    out = {}
    try:
        for w in (1, 2):
            c = distributed.LocalCluster(processes=False, n_workers=w, threads_per_worker=1,
                                         dashboard_address=None)
            out[w] = (c, distributed.Client(c, set_as_default=False))
            out[w][1].wait_for_workers(w, timeout=TIMEOUT)
        yield out
    finally:
        for c, client in reversed(list(out.values())):
            client.close()
            c.close()


def test_interleaved_alternates_the_clusters_and_records_every_run(ds, thread_clusters):
    calls = []

    def fn(w, client):
        calls.append(w)
        assert distributed.get_client() is client  # that cluster's client is current
        return client.submit(lambda x: x + 1, w, pure=False).result(timeout=TIMEOUT)

    settles = {w: (lambda: None) for w in thread_clusters}
    got = ds.interleaved(thread_clusters, fn, 4, settles, keep=lambda v: 10 * v)
    assert calls == [1, 2, 2, 1, 1, 2, 2, 1]  # 1, 2 in even rounds, 2, 1 in odd ones
    assert len(got["loadavg_rounds"]) == 4 and len(got["paired_speedups"]) == 4
    for w, g in got["clusters"].items():
        assert g["values"] == [10 * (w + 1)] * 4
        assert len(g["times"]) == len(g["cpu"]) == 4 and min(g["times"]) > 0
        assert len(g["stream"]) == 4  # one task per run, from that cluster's task stream only
        assert all(f"worker{i}" in c and "client+scheduler" in c for c in g["cpu"] for i in range(w))
    t1, t2 = got["clusters"][1]["times"], got["clusters"][2]["times"]
    assert got["paired_speedups"] == pytest.approx([a / b for a, b in zip(t1, t2)])


def test_idle_cpu_reports_every_process_per_second(ds, thread_clusters):
    got = ds.idle_cpu(thread_clusters, 0.05)
    assert set(got) == {"client+scheduler", "c1.worker0", "c2.worker0", "c2.worker1"}
    assert all(np.isfinite(v) and v >= 0 for v in got.values())


def test_cluster_config_and_parts_are_checked(ds):
    with pytest.raises(SystemExit):
        ds.main(["--parts", "rhs,bogus"])
    with pytest.raises(SystemExit):
        ds.main(["--cluster-config", "tiny"])
    with pytest.raises(SystemExit):
        ds.main(["--idle-seconds", "0"])
    with pytest.raises(KeyError):
        ds.cluster_config("tiny")


@pytest.mark.slow
def test_tiny_rhs_part_records_the_target_statistics(ds):
    """The whole ``rhs`` part, Babai, 2 x 10 000 RHS chunks: results checked inside."""
    args = type("Args", (), {"k": 20_000, "chunk": "10000", "repeats": 1, "rounds": 3, "batches": 2,
                             "solvers": "babai"})()
    out = {}
    before = dask.config.get("scheduler", None)
    ds.bench_rhs(args, out)
    assert dask.config.get("scheduler", None) == before  # the clients restored the configuration
    e = out["rhs"]["solvers"]["babai"]["chunkings"]["10000"]
    for mode in ds.ROUND_MODES:
        for w in (1, 2):
            assert len(e[f"{mode}_runs_workers{w}_s"]) == 3
            assert e[f"{mode}_workers{w}_s"] == min(e[f"{mode}_runs_workers{w}_s"])
            assert e[f"{mode}_stats_workers{w}"]["n"] == 3
        assert len(e[f"{mode}_loadavg_rounds"]) == 3
        assert e[f"{mode}_speedup_2_vs_1"] == pytest.approx(e[f"{mode}_workers1_s"] / e[f"{mode}_workers2_s"])
    assert len(e["shipped_runs_workers1_s"]) == 1  # the expensive modes: --repeats runs
    for w in (1, 2):  # the workers' malloc setting (see WORKER_MMAP_THRESHOLD) took effect
        assert out["rhs"][f"malloc_env_workers{w}"]["MALLOC_MMAP_THRESHOLD_"] == str(ds.WORKER_MMAP_THRESHOLD)
    for w in (1, 2):  # the start of one run taken apart from the scheduler's and the worker's logs
        tl = e[f"fused_timeline_workers{w}"]
        st = tl["start_story"]
        order = [st["client_sent_s"], st["scheduler_processing_s"], st["worker_received_s"], st["worker_executing_s"]]
        assert 0 < order[0] and order == sorted(order) and order[-1] <= tl["start_s"] + 0.005
    assert out["rhs"]["cluster_config"] == {"name": "small", "keys": ds.SMALL_MACHINE_CONFIG}
    idle = out["rhs"]["idle_ms_per_s"]  # both clusters' idle cost, per process
    assert set(idle) == {"client+scheduler", "c1.worker0", "c2.worker0", "c2.worker1"}
    assert all(v >= 0 for v in idle.values())
    pl = e["plain"]  # the same work in plain processes, checked against the in-memory codes inside
    assert pl["processes1"]["n"] == pl["processes2"]["n"] == 3 and len(pl["processes2"]["cpu_s"]) == 2
    assert pl["speedup_2_vs_1"] == pytest.approx(pl["processes1"]["min_s"] / pl["processes2"]["min_s"])
    head = out["rhs"]["target_babai"]
    assert head["statistic"].startswith("min over the interleaved runs")
    t = head["10000"]["fused"]
    assert np.isfinite(t["speedup"]) and np.isfinite(t["speedup_median"]) and t["runs"] == 3
    assert len(t["task_wait_workers2_s"]) == 2


def _flat(tree, prefix=""):
    """A nested YAML mapping as {"a.b.c": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_docs_small_machine_config_is_the_benchmarks(ds):
    """The configuration docs/scaling_out.md recommends on a small machine is the one the
    benchmark runs its clusters with (and parses to what dask reads)."""
    import yaml

    page = (BENCH.parent / "docs" / "scaling_out.md").read_text()
    section = page[page.index("**A small machine: cut the cluster's idle costs.**"):]
    block = section[section.index("```yaml\n") + len("```yaml\n"):section.index("```\n", section.index("```yaml\n") + 8)]
    documented = _flat(yaml.safe_load(textwrap.dedent(block)))
    assert documented == ds.SMALL_MACHINE_CONFIG
    assert ds.cluster_config("small") == ds.SMALL_MACHINE_CONFIG and ds.cluster_config("default") == {}
    assert ds.CLUSTER_CONFIG == "small"  # the benchmark's default follows the docs' advice


def _periodic_ms(server, names):
    return {name: (server.periodic_callbacks[name].callback_time if name in server.periodic_callbacks else None)
            for name in names}


def _worker_periodic(dask_worker):
    import dask as dask_

    return {"profile": "profile" in dask_worker.periodic_callbacks,
            "profile_enabled": dask_.config.get("distributed.worker.profile.enabled"),
            **_periodic_ms(dask_worker, ("tick", "monitor", "memory_monitor"))}


def test_small_machine_config_reaches_scheduler_nannies_and_workers(ds):
    """``cluster()`` with the small-machine configuration: the scheduler, the nanny (in this
    process) and the worker process all run their periodic jobs at the configured
    intervals, the worker without the profiler."""
    c, client = ds.cluster(1, config="small")
    try:
        client.wait_for_workers(1, timeout=TIMEOUT)
        sched = client.run_on_scheduler(lambda dask_scheduler: _periodic_ms(dask_scheduler, ("tick", "monitor")))
        assert sched == {"tick": 1000, "monitor": 2000}
        (nanny,) = c.workers.values()
        assert _periodic_ms(nanny, ("tick", "monitor", "memory_monitor")) == {
            "tick": 1000, "monitor": 2000, "memory_monitor": 1000}
        (w,) = client.run(_worker_periodic).values()
        assert w == {"profile": False, "profile_enabled": False, "tick": 1000, "monitor": 2000,
                     "memory_monitor": 1000}
    finally:
        client.close()
        c.close()
    # distributed's defaults are back once the cluster is made
    assert dask.config.get("distributed.admin.tick.interval") == "20ms"
    assert dask.config.get("distributed.worker.profile.enabled") is True

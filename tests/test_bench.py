"""``reformer-core bench``: statistics, alternation, FLOP rates, threads, peers, early failures."""

import io
import json
import sys

import pytest

import reformer_core
from reformer_core._progress import Progress
from reformer_core.bench import harness, peers, report, threads, timing
from reformer_core.cli import main

TINY = ["--lengths", "128", "--hashes", "1", "--no-local", "--no-train", "--no-memory", "--no-progress", "--no-peers"]


# ---------------------------------------------------------------- statistics


def test_summarize_gives_min_median_max_and_flags_spread():
    calm = timing.summarize([1.0, 1.1, 1.05], max_spread=1.5)
    assert (calm["min_s"], calm["median_s"], calm["max_s"]) == (1.0, 1.05, 1.1)
    assert calm["spread"] == 1.1 and calm["noisy"] is False and calm["iqr_s"] == pytest.approx(0.05)
    noisy = timing.summarize([1.0, 3.0, 1.0], max_spread=1.5)  # one slow repeat injected
    assert noisy["noisy"] is True and noisy["spread"] == 3.0 and noisy["median_s"] == 1.0
    assert timing.summarize([1.0, 3.0], max_spread=4.0)["noisy"] is False
    assert timing.summarize([])["median_s"] is None


def test_round_robin_alternates_calls_and_pairs_rounds():
    order = []
    ticks = iter(range(1000))

    def clock():
        return float(next(ticks))

    def make(name):
        return (lambda: order.append(name) or name), (lambda *results: None)

    rounds = []
    result = timing.time_round_robin([make("A"), make("B")], warmup=1, repeats=3, clock=clock,
                                     on_round=rounds.append)
    assert order == ["A", "B", "A", "B", "A", "B", "A", "B"]  # warm-ups, then A B per round
    assert rounds == [0, 1, 2]
    (first_a, times_a), (first_b, times_b) = result
    assert first_a == first_b == 1.0 and times_a == times_b == [1.0, 1.0, 1.0]


def test_round_robin_drops_a_failing_call_and_goes_on():
    errors = []

    def boom():
        raise RuntimeError("no")

    result = timing.time_round_robin([(boom, lambda *r: None), (lambda: 1, lambda *r: None)], warmup=1, repeats=2,
                                     on_error=lambda index, error: errors.append((index, str(error))))
    assert errors == [(0, "no")] and result[0] == (None, []) and len(result[1][1]) == 2


def test_paired_ratio_cancels_a_burst_that_hits_both():
    # round 1 is ten times slower for both (a burst of load): the per-round ratio is unchanged
    assert timing.paired_ratio([2.0, 20.0, 2.0], [1.0, 10.0, 1.0]) == 2.0
    assert timing.paired_ratio([], []) is None


def test_flop_counts_and_rates():
    full = timing.attention_flops("full", "forward", batch=1, heads=2, length=128, head_dim=64)
    assert full == 4 * 2 * 128 * 128 * 64
    lsh = timing.attention_flops("lsh", "forward", batch=1, heads=2, length=1024, head_dim=64, chunk_length=64,
                                 num_chunks_before=1, num_chunks_after=0, num_hashes=4)
    assert lsh == 4 * 2 * 4 * 1024 * 128 * 64  # 4 rounds, each query against a window of 2 chunks
    assert timing.attention_flops("lsh", "backward", batch=1, heads=2, length=1024, head_dim=64,
                                  num_hashes=4) == 4 * lsh
    assert timing.attention_flops("local", "forward", batch=1, heads=1, length=32, head_dim=8,
                                  chunk_length=64) == 4 * 32 * 32 * 8  # one chunk: the whole length
    assert timing.attention_flops("train", "step", batch=1, heads=1, length=64, head_dim=8) is None
    assert timing.projection_flops("forward", batch=1, length=10, d_model=4, width=4, outputs=2) == 2 * 10 * 4 * 4 * 2
    assert timing.rates(2e9, 0.5, 8.0) == (4.0, 50.0)
    assert timing.rates(None, 0.5, 8.0) == (None, None)


# ---------------------------------------------------------------- threads and load


def test_oversubscription_warnings():
    pools = [{"internal_api": "openblas", "filepath": "libopenblas.so", "num_threads": 8}]
    warnings = threads.oversubscription_warnings(2, pools, load=5.0, cores=2)
    assert any("load average 5.00 is above the 2 usable cores" in w for w in warnings)
    assert any("openblas" in w and "8 threads" in w for w in warnings)
    assert any("oversubscribed" in w for w in threads.oversubscription_warnings(2, [], load=1.0, cores=2))
    assert threads.oversubscription_warnings(1, [], load=0.2, cores=2) == []
    assert any("more than the 2" in w for w in threads.oversubscription_warnings(4, [], load=0.0, cores=2))


def test_pinned_threads_limits_blas_and_restores(monkeypatch):
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info()]
    with threads.pinned_threads(1) as info:
        assert info["requested"] == 1 and info["blas"] == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert [p["num_threads"] for p in threadpool_info()] == before


# ---------------------------------------------------------------- the command and its JSON


def test_bench_json_has_statistics_threads_and_rates(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "--backends", "numpy", *TINY, "--threads", "1", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["settings"]["threads"] == 1 and data["threads"]["requested"] == 1
    assert data["settings"]["repeats"] == 3
    assert "load_1min_start" in data and isinstance(data["warnings"], list)
    rate = data["matmul"]["numpy:cpu:float32"]
    assert rate["gflops"] > 0 and rate["size"] == 1024
    rows = data["results"]
    assert {(r["method"], r["pass"]) for r in rows} == {(m, p) for m in ("lsh-1", "full") for p in ("forward", "backward")}
    for row in rows:
        assert row["status"] == "ok" and len(row["times_s"]) == 3
        assert row["min_s"] <= row["median_s"] == row["time_s"] <= row["max_s"]
        assert row["spread"] >= 1 and isinstance(row["noisy"], bool)
        assert row["flops"] > 0 and row["gflops"] == pytest.approx(row["flops"] / row["time_s"] / 1e9, rel=1e-3)
        assert row["matmul_pct"] == pytest.approx(100 * row["gflops"] / rate["gflops"], rel=1e-2)
    lsh = next(r for r in rows if r["method"] == "lsh-1" and r["pass"] == "forward")
    assert lsh["reference"] == "numpy full" and lsh["speedup"] > 0


def test_an_injected_slow_repeat_is_flagged():
    ticks = iter(range(100000))

    def clock():  # every call takes 10 ms, except that one timed call of the first round pair takes a second
        n = next(ticks)
        return n * 0.01 + (1.0 if n >= 9 else 0.0)

    settings = harness.BenchSettings(lengths=(128,), num_hashes=(1,), include_local=False, include_train=False,
                                    passes=("forward",), measure_memory=False, repeats=3, peers=False)
    data = harness.run_benchmark(settings, clock=clock)
    rows = {r["method"]: r for r in data["results"]}
    # ticks 0-3: the warm-ups; 4-5 lsh round 0, 6-7 full round 0, 8-9 lsh round 1 (the slow one)
    assert rows["lsh-1"]["noisy"] is True and rows["lsh-1"]["spread"] == pytest.approx(101.0)
    assert rows["full"]["noisy"] is False
    text = report.format_report(data)
    assert "!" in text and any("spread" in w for w in data["warnings"])


def test_alternation_order_in_a_run(monkeypatch):
    """Rows of one length and pass are called A B A B, across methods."""
    calls = []

    def fake_call_for(method, pass_name, length, settings, backend, jit=False):
        return (lambda: calls.append((method.name, pass_name))), None

    monkeypatch.setattr(harness, "_call_for", fake_call_for)
    settings = harness.BenchSettings(lengths=(128,), num_hashes=(1,), include_local=False, include_train=False,
                                    measure_memory=False, repeats=2, peers=False)
    harness.run_benchmark(settings)
    forward = [name for name, p in calls if p == "forward"]
    assert forward == ["lsh-1", "full"] * 3  # the warm-ups, then two rounds
    assert [p for _, p in calls] == ["forward"] * 6 + ["backward"] * 6


def test_plot_without_matplotlib_fails_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(harness, "run_benchmark", must_not_run)
    monkeypatch.setattr("reformer_core.bench.command.memory_report", must_not_run)
    for extra in ([], ["--memory"]):
        assert main(["bench", "--backends", "numpy", "--plot", str(tmp_path / "p.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert "--plot needs matplotlib" in err and "pip install" in err


def test_a_device_that_is_not_here_is_skipped_with_its_reason(tmp_path, capsys):
    if "torch" not in reformer_core.available_backends():
        pytest.skip("needs torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    path = tmp_path / "bench.json"
    assert main(["bench", "--backends", "numpy,torch:cuda", *TINY, "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "skipping torch:cuda" in captured.err and "skipped backend torch:cuda" in captured.out
    data = json.loads(path.read_text())
    assert list(data["backends"]) == ["numpy"] and "torch:cuda" in data["skipped_backends"]
    assert main(["bench", "--backends", "torch:cuda", *TINY]) == 2  # nothing left to run: fail before any work
    assert "no backend of --backends can run here" in capsys.readouterr().err


def test_standard_suffix_runs_under_the_standard_path(monkeypatch):
    assert harness.spec_options("torch:cuda+jit+standard") == ("torch:cuda", True, True)
    assert harness.spec_options("torch+standard+jit") == ("torch", True, True)
    assert harness.split_spec("torch+standard") == ("torch", False)
    assert harness.bench_targets("numpy,numpy+standard") == (("numpy", "numpy+standard"), {})
    seen = []

    def fake_call_for(method, pass_name, length, settings, backend, jit=False):
        return (lambda: seen.append(reformer_core.uses_standard_path())), None

    monkeypatch.setattr(harness, "_call_for", fake_call_for)
    settings = harness.BenchSettings(backends=("numpy", "numpy+standard"), lengths=(128,), num_hashes=(1,),
                                    include_full=False, include_local=False, include_train=False, passes=("forward",),
                                    measure_memory=False, repeats=1, peers=False)
    data = harness.run_benchmark(settings)
    assert data["backends"]["numpy+standard"]["standard_path"] is True
    assert seen == [False, True, False, True]  # warm-ups, then one round, alternating


def test_progress_is_throttled_when_not_a_terminal():
    now = [0.0]
    stream = io.StringIO()
    with Progress(10, label="bench", stream=stream, clock=lambda: now[0], min_interval=5) as progress:
        for step in range(10):
            now[0] = float(step)
            progress.step(f"row {step}")
            progress.note("round 1/3")
    lines = stream.getvalue().splitlines()
    # the first row, the first line due after 5 s, the last row, and done: not a line per step
    assert [line.split("] ")[1] for line in lines] == ["row 0", "row 5 (+4 earlier steps)",
                                                       "row 9 (+3 earlier steps)", "done"]


def test_memory_report_shows_progress_and_plots(tmp_path):
    from reformer_core.bench import depth

    steps = []

    class Recorder:
        def step(self, message):
            steps.append(message)

    data = depth.memory_report(quick=True, backends=("numpy",), depths=(1, 2), length=128, lengths=(64, 128),
                               progress=Recorder())
    assert len(steps) == depth.memory_rows(backends=("numpy",), depths=(1, 2), lengths=(64, 128)) == 8
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    report.plot_memory_report(data, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_has_a_panel_per_attention_kind(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    def fake_call_for(method, pass_name, length, settings, backend, jit=False):
        return (lambda: None), None

    monkeypatch.setattr(harness, "_call_for", fake_call_for)
    settings = harness.BenchSettings(lengths=(128, 256), num_hashes=(1, 2), repeats=1, measure_memory=False,
                                    peers=False)
    data = harness.run_benchmark(settings)
    for i, row in enumerate(data["results"]):  # instant fake calls: give them plottable numbers
        row["time_s"], row["peak_memory_bytes"] = 1e-3 * (i + 1), 2**20 * (i + 1)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    path = tmp_path / "bench.png"
    report.plot_report(data, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    (figure,) = figures
    titles = [ax.get_title().split("\n")[0] for ax in figure.axes[:4]]
    assert titles == ["LSH attention", "local attention", "full attention (core and native)", "training step"]
    # rows: forward time, fwd+bwd time, memory; the legend outside the axes; log-log with labelled ticks
    assert len(figure.axes) == 12 and figure.legends
    assert figure.axes[0].get_xscale() == figure.axes[0].get_yscale() == "log"
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["128", "256"]
    assert "float32" in figure._suptitle.get_text() and "numpy" in figure._suptitle.get_text()


def test_peer_rows_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    if "torch" not in reformer_core.available_backends():
        pytest.skip("needs torch")
    settings = harness.BenchSettings(backends=("torch",), lengths=(128,), num_hashes=(1,), include_local=False,
                                    include_train=False, measure_memory=False, repeats=3)
    data = harness.run_benchmark(settings)
    rows = {(r["backend"], r["method"], r["pass"]): r for r in data["results"]}
    expected = {"reformer-core", "hf-transformers", "torch-sdpa"} | (
        {"reformer-pytorch"} if "reformer-pytorch" in peers.installed_peers() else set())
    assert {r["backend"] for r in data["results"] if r["peer"]} == expected
    for pass_name in ("forward", "backward"):
        hf = rows[("hf-transformers", "lsh-1", pass_name)]
        ours = rows[("reformer-core", "lsh-1", pass_name)]
        assert hf["status"] == ours["status"] == "ok" and len(hf["times_s"]) == 3
        assert ours["reference"] == "hf-transformers lsh-1" and ours["speedup"] > 0
        attention_only = rows[("torch", "lsh-1", pass_name)]["flops"]
        assert ours["flops"] == hf["flops"] > attention_only  # the projections are counted
        assert rows[("torch-sdpa", "native-full", pass_name)]["status"] == "ok"
    assert data["backends"]["hf-transformers"]["peer"] is True
    assert "hf-transformers" in report.format_report(data)

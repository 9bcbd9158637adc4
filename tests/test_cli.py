"""The ``reformer-core`` command line: info, bench, errors, and no framework on import."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

import reformer_core
from reformer_core.bench import harness
from reformer_core._progress import Progress
from reformer_core.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_lists_every_known_backend(capsys):
    import reformer_core

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "ready" in out
    for name in reformer_core.known_backends():
        assert name in out
    assert "python" in out and "platform" in out


def test_info_json_marks_numpy_usable(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    by_name = {entry["name"]: entry for entry in info["backends"]}
    assert by_name["numpy"]["usable"] and by_name["numpy"]["devices"] == ["cpu"]
    for entry in info["backends"]:
        assert entry["installed"] or entry["install"].startswith("pip install")


def test_info_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "reformer_core.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "numpy" in result.stdout


def test_bench_quick_writes_json_and_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "out" / "bench.json"
    plot = tmp_path / "bench.png"
    status = main(["bench", "--quick", "--backends", "numpy", "--lengths", "128,256", "--json", str(path),
                   "--plot", str(plot), "--no-progress"])
    assert status == 0
    out = capsys.readouterr().out
    assert "lsh x2" in out and "full" in out and "local" in out and "train step" in out and "fwd+bwd" in out

    report = json.loads(path.read_text())
    assert report["schema"] == harness.SCHEMA
    assert report["settings"]["lengths"] == [128, 256]
    assert report["settings"]["repeats"] == 3  # --quick shortens sizes, not repeats
    assert report["settings"]["causal"] is True and report["settings"]["dtype"] == "float32"
    assert report["versions"]["numpy"] and report["versions"]["python"]
    assert report["hardware"]["cpu_count"] >= 1 and report["hardware"]["platform"]
    assert report["backends"]["numpy"]["backend"] == "numpy"
    methods = [m["name"] for m in report["methods"]]
    assert methods == ["lsh-1", "lsh-2", "local", "full", "native-full", "train"]  # --quick: 1 and 2 hashes
    assert len(report["results"]) == 2 * (4 * 2 + 1)  # NumPy has no native attention kernel
    for row in report["results"]:
        assert row["status"] == "ok", row
        assert row["time_s"] > 0 and len(row["times_s"]) == 3 and row["first_call_s"] > 0
        assert row["min_s"] <= row["time_s"] <= row["max_s"]
        assert row["peak_memory_bytes"] > 0 and row["memory_kind"] == "host (tracemalloc)"
        assert row["time_vs_first"] is not None
        if row["kind"] == "lsh":
            assert row["num_buckets"] == harness.default_num_buckets(row["length"], 64)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_speed_figure_keeps_tokens_fixed(capsys):
    settings = harness.BenchSettings(lengths=(128, 256, 512), fixed_tokens=512, num_hashes=(1, 2), include_local=False,
                                    include_train=False, passes=("forward",), repeats=1, measure_memory=False)
    report = harness.run_benchmark(settings)
    assert {(r["length"], r["batch"]) for r in report["results"]} == {(128, 4), (256, 2), (512, 1)}
    text = harness.format_report(report)
    assert "speed figure (512 tokens per step)" in text and "max/min" in text


def test_bench_skips_over_memory_budget(capsys):
    # full attention at L=1024: 4 * 1024^2 * 2 heads * 4 bytes = 32 MiB > 0.02 GB
    settings = harness.BenchSettings(lengths=(256,), num_hashes=(1,), repeats=1, memory_budget_gb=0.02,
                                    include_local=False, include_train=False)
    report = harness.run_benchmark(settings)
    assert {r["status"] for r in report["results"]} == {"ok"}
    settings = harness.BenchSettings(lengths=(1024,), num_hashes=(1,), repeats=1, memory_budget_gb=0.02,
                                    include_local=False, include_train=False, passes=("forward",))
    report = harness.run_benchmark(settings)
    statuses = {r["method"]: r["status"] for r in report["results"]}
    assert statuses == {"lsh-1": "ok", "full": "skipped: memory"}
    assert "skip memory" in harness.format_report(report)


def test_bench_skips_when_time_budget_runs_out():
    settings = harness.BenchSettings(lengths=(128, 256), num_hashes=(1,), repeats=1, time_budget_s=1e-9)
    report = harness.run_benchmark(settings)
    assert {r["status"] for r in report["results"]} == {"skipped: time"}


def test_bench_unknown_backend_fails_clearly(capsys):
    assert main(["bench", "--backends", "nosuch", "--quick"]) != 0
    err = capsys.readouterr().err
    assert "unknown backend 'nosuch'" in err and "numpy" in err


def test_bench_rejects_bad_lengths(capsys):
    assert main(["bench", "--lengths", "100"]) != 0
    assert "multiple of chunk_length" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--lengths", "abc"])
    assert exit_info.value.code != 0


def test_bench_console_script_exit_status():
    result = subprocess.run(
        [sys.executable, "-m", "reformer_core.cli", "bench", "--backends", "nosuch"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "nosuch" in result.stderr


def test_importing_the_cli_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import reformer_core
        import reformer_core.cli
        import reformer_core.bench.harness
        import reformer_core._progress
        loaded = sorted(m for m in ("torch", "jax", "jaxlib", "cupy") if m in sys.modules)
        print(",".join(loaded))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing reformer_core.cli imported {result.stdout.strip()}"


def test_progress_prints_a_line_per_step_when_not_a_tty():
    stream = io.StringIO()
    with Progress(3, label="bench", stream=stream, min_interval=0) as progress:
        progress.step("first")
        progress.step("second")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("bench [1/3") and lines[0].endswith("first")
    assert lines[-1].endswith("done")


def test_progress_redraws_one_line_on_a_tty():
    stream = io.StringIO()
    progress = Progress(2, stream=stream, tty=True, width=4)
    progress.step("a")
    progress.step("b")
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 3 and "[####]" in text


def test_progress_disabled_writes_nothing():
    stream = io.StringIO()
    with Progress(2, stream=stream, enabled=False) as progress:
        progress.step("a")
    assert stream.getvalue() == ""


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-test-command"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip()
    assert "python -m pytest" in command
    assert command in readme


def test_bench_quick_on_every_installed_cpu_backend(tmp_path, capsys):
    """What CI runs: `reformer-core bench --quick` on the installed CPU backends side by side
    (small lengths here to keep the suite fast), valid JSON and a PNG."""
    pytest.importorskip("matplotlib")
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    status = main(["bench", "--quick", "--lengths", "128,256", "--hashes", "2", "--json", str(path),
                   "--plot", str(plot), "--no-progress", "--no-peers"])  # peers: tests/test_bench.py
    assert status == 0
    report = json.loads(path.read_text())
    expected = [name for name in ("numpy", "torch", "jax") if name in reformer_core.available_backends()]
    assert list(report["backends"]) == expected
    assert {row["status"] for row in report["results"]} == {"ok"}
    assert plot.stat().st_size > 1000
    for name in set(expected) - {"numpy"}:  # the framework's fused kernel, side by side
        native = [row for row in report["results"] if row["backend"] == name and row["kind"] == "native"]
        assert {row["pass"] for row in native} == {"forward", "backward"} and all(row["time_s"] > 0 for row in native)
    if "jax" in expected:
        assert report["backends"]["jax"]["compiled"] is True


def test_bench_jit_specs():
    installed = reformer_core.available_backends()
    with pytest.raises(ValueError, match=r"numpy\+jit: backend 'numpy' cannot compile functions; drop \+jit"):
        harness.resolve_backends("numpy+jit")
    if "torch" in installed:
        assert harness.resolve_backends("torch,torch+jit") == ("torch", "torch+jit")
        settings = harness.BenchSettings(backends=("torch+jit",), lengths=(128,), num_hashes=(1,))
        # torch.compile cannot trace autograd.grad, so no compiled training-step row
        assert [m.name for m in harness.planned_methods("torch+jit", settings)] == ["lsh-1", "local", "full",
                                                                                   "native-full"]
        assert [m.name for m in harness.planned_methods("torch", settings)][-1] == "train"


def test_timings_wait_for_asynchronous_results():
    """The timer hands each result to ``synchronize``: JAX would otherwise time its dispatch only."""
    seen = []
    first, times = harness.time_calls(lambda: "result", lambda *arrays: seen.append(arrays), warmup=1, repeats=2)
    assert seen == [("result",)] * 3 and len(times) == 2

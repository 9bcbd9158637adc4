"""`reformer-core --version`, `train --checkpoint/--resume` (exact continuation), CLI advice in
`train`'s errors, and throttled progress lines when stderr is not a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

import reformer_core as rc
from reformer_core import cli

TINY = ["train", "--length", "16", "--chunk-length", "4", "--d-model", "16", "--batch", "2", "--no-progress"]


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"reformer-core {metadata.version('reformer-core')}"


def test_version_falls_back_to_the_source_tree(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", not_installed)
    assert cli.package_version() == rc.__version__


def train(tmp_path, name: str, *flags: str) -> list[float]:
    report = tmp_path / f"{name}.json"
    assert cli.main([*TINY, "--json", str(report), "--checkpoint", str(tmp_path / f"{name}.npz"), *flags]) == 0
    return [point["loss"] for point in json.loads(report.read_text())["curve"]]


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, capsys):
    whole = train(tmp_path, "whole", "--steps", "8")
    first = train(tmp_path, "first", "--steps", "4")
    rest = train(tmp_path, "rest", "--steps", "8", "--resume", str(tmp_path / "first.npz"))
    assert len(whole) == 8 and len(first) == len(rest) == 4
    assert first + rest == whole  # bit for bit on NumPy
    a, b = rc.load_checkpoint(tmp_path / "whole.npz"), rc.load_checkpoint(tmp_path / "rest.npz")
    with np.load(tmp_path / "whole.npz") as x, np.load(tmp_path / "rest.npz") as y:
        stored = [k for k in x.files if k.startswith(("params/", "optimizer/"))]
        assert stored and any(k.startswith("optimizer/") for k in stored)
        for k in stored:
            assert np.array_equal(x[k], y[k]), k
    assert a.metadata["train"]["step"] == b.metadata["train"]["step"] == 8
    assert int(b.optimizer_state["step"]) == 8


def test_resume_with_other_settings_names_the_flags(tmp_path, capsys):
    train(tmp_path, "first", "--steps", "2")
    capsys.readouterr()
    status = cli.main([*TINY[:5], "--d-model", "32", *TINY[7:], "--steps", "4", "--resume", str(tmp_path / "first.npz")])
    assert status == 2
    error = capsys.readouterr().err
    assert "--d-model 16" in error and "Traceback" not in error
    assert cli.main([*TINY, "--steps", "2", "--resume", str(tmp_path / "first.npz")]) == 2
    assert "pass --steps above 2" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path, capsys, tiny_config):
    rc.save_checkpoint(tmp_path / "plain.npz", rc.init_params(tiny_config, seed=0), tiny_config)
    assert cli.main([*TINY, "--steps", "4", "--resume", str(tmp_path / "plain.npz")]) == 2
    assert "not a checkpoint of `reformer-core train --checkpoint`" in capsys.readouterr().err


@pytest.mark.parametrize("length, advice", [("100", "--length 96 or --length 112"), ("7", "--length 6 or --length 8"),
                                            ("3", "--length 4")])
def test_length_errors_give_cli_advice(capsys, length, advice):
    assert cli.main(["train", "--length", length, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert advice in error and "--chunk-length 16" in error
    assert "pad_to_multiple" not in error and "lsh_chunk_length" not in error


def test_progress_to_a_pipe_is_throttled():
    completed = subprocess.run([sys.executable, "-m", "reformer_core.cli", *TINY[:-1], "--steps", "30"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.startswith("train [")]
    assert 2 <= len(lines) <= 4, lines  # first step, last step, done: not one per step
    assert "earlier step" in completed.stderr


def test_ctrl_c_stops_between_steps_and_the_checkpoint_resumes_exactly(tmp_path):
    import signal
    import time

    steps = "300"
    process = subprocess.Popen([sys.executable, "-m", "reformer_core.cli", *TINY[:-1], "--steps", steps,
                                "--json", str(tmp_path / "first.json"), "--checkpoint", str(tmp_path / "first.npz")],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stderr.readline().startswith("train [")  # the first step ran
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopping after this step" in err
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["final"]["interrupted"] and first["final"]["steps"] < int(steps)
    rest = train(tmp_path, "rest", "--steps", steps, "--resume", str(tmp_path / "first.npz"))
    whole = train(tmp_path, "whole", "--steps", steps)
    assert [p["loss"] for p in first["curve"]] + rest == whole


def test_check_shows_progress_per_test_while_it_runs(capsys):
    assert cli.main(["check", "--backends", "numpy", "--max-examples", "1"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("check [")]
    assert lines and "test_" in lines[0] and lines[-1].endswith("done"), captured.err
    total = int(lines[-1].split("/", 1)[1].split()[0])
    assert total >= 10 and f"[{total}/{total}" in lines[-1]  # counted before the run, every test seen
    assert "numpy" in captured.out and "pass" in captured.out


def test_check_without_the_test_extra_names_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hypothesis" else real(name, *a))
    assert cli.main(["check", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "hypothesis" in err and "reformer-core[test]" in err

"""Every script in examples/ runs, at small sizes, as a user would run it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd=None) -> str:
    completed = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                               timeout=120, cwd=cwd, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert completed.returncode == 0, f"{name} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def test_train_example_lowers_the_loss_and_saves_a_checkpoint(tmp_path):
    import reformer_core as rc

    out = run_example("train.py", "--steps", "40", "--checkpoint", str(tmp_path / "model.npz"), cwd=tmp_path)
    first, last = (float(word) for word in out.splitlines()[-1].split()[1:4:2])
    assert last < first
    checkpoint = rc.load_checkpoint(tmp_path / "model.npz")
    assert checkpoint.metadata["step"] == 40 and checkpoint.optimizer_state is not None


def test_compare_backends_example_prints_both_rows():
    out = run_example("compare_backends.py", "--backends", "numpy,strict", "--length", "256", "--repeats", "3")
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert rows == ["numpy", "strict"]


def test_custom_backend_example_passes_the_conformance_suite():
    out = run_example("custom_backend.py", "--max-examples", "2")
    assert "pytest exit status 0" in out
    assert "fail" not in out.split("backend", 1)[1].replace("pytest exit status", "")


def test_every_example_is_tested():
    tested = {"train.py", "compare_backends.py", "custom_backend.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested

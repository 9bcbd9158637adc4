"""The conformance suite itself: its strategies, tie handling, targets, reproductions, and
proof that it catches a broken backend (and passes a faithful wrapper of a correct one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import reformer_core as rc
from reformer_core.conformance import reproduce
from reformer_core.conformance.check import format_table, summarise
from reformer_core.conformance.components import COMPONENTS, run_check
from reformer_core.conformance.oracle import bucket_margins, check_buckets
from reformer_core.conformance.strategies import (
    AttentionCase,
    LayerCase,
    ModelCase,
    attention_cases,
    layer_cases,
    model_cases,
)
from reformer_core.conformance.targets import ENV_VAR, Target, make_target, parse_specs
from reformer_core.conformance.tolerances import tolerance_for

from broken_backends import Faithful, PerturbedMatmul, SelfMaskDropped

TESTS = Path(__file__).parent


# ---------------------------------------------------------------- strategies generate what they claim


@settings(max_examples=60, deadline=None)
@given(attention_cases())
def test_attention_cases_are_valid(case):
    assert case.length <= case.chunk_length or case.length % case.chunk_length == 0
    factors = case.num_buckets if isinstance(case.num_buckets, tuple) else (case.num_buckets,)
    assert all(f >= 2 and f % 2 == 0 for f in factors)
    arrays = case.arrays()
    assert arrays["qk"].shape == (case.batch, case.heads, case.length, case.head_dim)
    assert arrays["rotations"].shape == (case.heads, case.head_dim, case.num_hashes, sum(factors) // 2)
    if case.real_lengths is not None:
        assert arrays["keep"].shape == (case.batch, case.length)
        assert arrays["keep"].sum(axis=1).min() >= 1  # every row keeps at least one real token
    # the library accepts every generated case
    rc.lsh_attention(arrays["qk"], arrays["v"], arrays["rotations"], attention_mask=arrays["keep"],
                     **case.lsh_kwargs())
    # arrays are a pure function of the seed
    np.testing.assert_array_equal(case.arrays()["v"], arrays["v"])


@settings(max_examples=40, deadline=None)
@given(layer_cases())
def test_layer_cases_are_valid(case):
    config = case.config()
    assert config.d_model == case.d_model and config.ff_chunk_length == case.ff_chunk_length
    assert case.arrays()["x"].shape == (case.batch, case.length, case.d_model)
    assert case.arrays()["tokens"].max() < case.vocab_size


@settings(max_examples=40, deadline=None)
@given(model_cases())
def test_model_cases_are_valid(case):
    config = case.config()
    config.validate_length(case.length)
    assert config.attention_layers == case.attention_layers
    assert case.arrays()["tokens"].shape == (case.batch, case.length)


def test_cases_repr_round_trips():
    from reformer_core.conformance import strategies

    for case in (AttentionCase(num_buckets=(2, 4), real_lengths=(3,)), LayerCase(), ModelCase()):
        assert eval(repr(case), vars(strategies)) == case


# ---------------------------------------------------------------- ties versus real mismatches


def test_bucket_ties_are_told_from_real_mismatches():
    rng = np.random.default_rng(0)
    rotations = rng.standard_normal((1, 4, 1, 2))  # 4 buckets: argmax of [xR_0, xR_1, -xR_0, -xR_1]
    x = rng.standard_normal((1, 1, 6, 4))
    # position 1: xR = [1, 1 + 1e-12], a tie between buckets 1 and 0 far below float32 rounding
    x[0, 0, 1] = np.linalg.lstsq(rotations[0, :, 0].T, np.array([1.0, 1.0 + 1e-12]), rcond=None)[0]
    margins, scale = bucket_margins(x, rotations, 4)
    assert margins[0, 0, 0, 1] < 1e-9 * scale[0, 0, 0, 1]
    oracle = np.asarray(rc.hash_vectors(x, rotations, 4))
    assert oracle[0, 0, 0, 1] == 1

    tie = oracle.copy()
    tie[0, 0, 0, 1] = 0
    expected, real = check_buckets(tie, x, rotations, 4, None, "float32")
    assert real == 0
    np.testing.assert_array_equal(expected, tie)  # resolved the backend's way

    clear = int(np.argmax(np.where(np.arange(6) == 1, -1.0, margins[0, 0, 0] / scale[0, 0, 0])))
    wrong = oracle.copy()
    wrong[0, 0, 0, clear] = (wrong[0, 0, 0, clear] + 1) % 4
    _, real = check_buckets(wrong, x, rotations, 4, None, "float32")
    assert real == 1  # a flip with a clear margin is never excused
    _, real = check_buckets(tie, x, rotations, 4, None, "float64")
    assert real == 1  # but 1e-12 is far more than float64 rounding (64 ulps ~ 1.4e-14): a real mismatch there


# ---------------------------------------------------------------- targets and tolerances


def test_targets_from_option_environment_and_defaults(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert parse_specs("numpy, strict:device1") == ["numpy", "strict:device1"]
    assert {"numpy", "strict"} <= set(parse_specs(None))
    monkeypatch.setenv(ENV_VAR, "strict")
    assert parse_specs(None) == ["strict"]
    target, why = make_target("strict:device1")
    assert target is not None and "device1" in str(target.device)
    target, why = make_target("nosuch")
    assert target is None and "unknown backend" in why
    target, why = make_target("torch:cuda9")
    assert target is None and why
    target, why = make_target("numpy+jit")
    assert target is None and "cannot compile" in why
    if "torch" in rc.available_backends():  # torch.compile cannot trace the checks' vjp: skipped with why
        target, why = make_target("torch+jit")
        assert target is None and "compiled path is checked against the eager one" in why


def test_tolerance_lookup():
    assert tolerance_for("float64", "numpy", "cpu").forward_rtol <= 1e-10
    assert tolerance_for("float32", "torch", "cuda:0").forward_rtol >= tolerance_for("float32", "torch", "cpu").forward_rtol
    assert tolerance_for("float32", "numpy", "cpu", "model").forward_rtol > tolerance_for("float32", "numpy", "cpu").forward_rtol
    with pytest.raises(KeyError, match="no tolerance"):
        tolerance_for("int8", "numpy", "cpu")


# ---------------------------------------------------------------- the suite catches broken adapters


CASES = {
    "hashing": AttentionCase(),
    "sorting": AttentionCase(),
    "lsh_attention": AttentionCase(length=16),
    "local_attention": AttentionCase(length=16),
    "full_attention": AttentionCase(),
    "feed_forward": LayerCase(ff_chunk_length=3),
    "embedding": LayerCase(),
    "reversible": ModelCase(attention_layers=("lsh", "local", "full")),
    "model": ModelCase(attention_layers=("lsh", "local", "full")),
}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_a_faithful_third_party_adapter_conforms(component):
    run_check(component, Target("broken_backends:Faithful", Faithful()), "float64", CASES[component])


@pytest.mark.parametrize("component", ["lsh_attention", "full_attention", "reversible", "model"])
def test_dropping_the_self_mask_is_caught(component):
    with pytest.raises(AssertionError, match=r"exceeds .*\n.*reproduce with"):
        run_check(component, Target("broken_backends:SelfMaskDropped", SelfMaskDropped()), "float64",
                  CASES[component])


@pytest.mark.parametrize("component", ["lsh_attention", "local_attention", "full_attention", "feed_forward",
                                       "embedding", "reversible", "model"])
def test_perturbing_one_entry_of_a_product_is_caught(component):
    with pytest.raises(AssertionError, match="exceeds"):
        run_check(component, Target("broken_backends:PerturbedMatmul", PerturbedMatmul()), "float64",
                  CASES[component])


def _run_suite(backends, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "REFORMER_CONFORMANCE_RESULTS": str(tmp_path / "rows.jsonl")}
    command = [sys.executable, "-m", "pytest", "--pyargs", "reformer_core.conformance", "-q", "-p", "no:cacheprovider",
               "-x", "--max-examples", "3", "--backends", backends, "-k", "attention"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_the_whole_suite_fails_a_broken_adapter_and_passes_a_faithful_one(tmp_path):
    broken = _run_suite("broken_backends:SelfMaskDropped", tmp_path)
    assert broken.returncode == 1, broken.stdout[-2000:]
    assert "reproduce(" in broken.stdout
    faithful = _run_suite("broken_backends:Faithful", tmp_path)
    assert faithful.returncode == 0, faithful.stdout[-2000:]


# ---------------------------------------------------------------- reproductions and the table


def test_a_failure_prints_a_reproduction_that_reproduces(capsys):
    target = Target("broken_backends:SelfMaskDropped", SelfMaskDropped())
    with pytest.raises(AssertionError) as failure:
        run_check("full_attention", target, "float64", AttentionCase())
    line = str(failure.value).split("reproduce with:\n", 1)[1].strip()
    assert line.startswith('python -c "') and "AttentionCase(" in line
    reproduce("full_attention", "numpy", "float64", AttentionCase())  # the same case on a good backend
    assert "conforms" in capsys.readouterr().out


def test_summary_table():
    rows = [
        {"backend": "numpy", "device": "cpu", "dtype": "float32", "component": "model", "quantity": "logits",
         "kind": "forward", "max_abs": 1e-7, "max_rel": 2e-7, "bound": 1e-4, "passed": True},
        {"backend": "numpy", "device": "cpu", "dtype": "float32", "component": "model", "quantity": "d x",
         "kind": "grad", "max_abs": 3e-6, "max_rel": 4e-6, "bound": 1e-6, "passed": False},
    ]
    (entry,) = summarise(rows)
    assert entry["forward_rel"] == 2e-7 and entry["grad_abs"] == 3e-6 and entry["failed"] == 1
    assert "FAIL (1)" in format_table([entry])


def test_check_command_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    completed = subprocess.run([sys.executable, "-m", "reformer_core.cli", "check", "--backends", "numpy",
                                "--max-examples", "2", "--json", str(out)], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "lsh_attention" in completed.stdout and "pass" in completed.stdout
    report = json.loads(out.read_text())
    assert {row["component"] for row in report["summary"]} == set(COMPONENTS)

"""The Triton LSH kernels (backends/torch/triton_lsh.py) against the standard Array-API path.

Triton decides at decoration time (when ``triton_lsh`` is imported) whether its kernels run
compiled or in the interpreter, so the comparisons run in one subprocess with
``TRITON_INTERPRET=1`` set before anything imports Triton: other test modules in this process
may already have imported it (or torch's inductor may have). Inside it, the torch adapter's
``lsh_chunk_attention`` is pointed at ``triton_lsh.lsh_chunk_attention``, so the public API
(``rc.lsh_attention`` with explicit rotations) hashes and sorts as always and the Triton
kernels run the step after on CPU tensors; the same inputs then run under
``rc.standard_path()``. Forward and both gradients must agree within ``conformance/tolerances.py``.

The interpreter is slow (each program is NumPy on tiles), so the shapes are small.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the Triton kernel needs PyTorch"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="Triton is not installed (pip install triton); the Triton LSH kernel is not tested"),
]

FIELDS = ("seed", "batch", "heads", "chunks", "chunk", "head_dim", "hashes", "before", "after", "causal", "padded",
          "dropout", "duplicate_correction", "dtype", "garbage")
CASES = {
    "one-hash-causal-f64": (0, 1, 1, 4, 8, 8, 1, 1, 0, True, False, 0.0, False, "float64", ""),
    "two-hashes-causal-padded-f32": (1, 1, 2, 4, 8, 16, 2, 1, 1, True, True, 0.0, False, "float32", ""),
    "three-hashes-odd-sizes-f64": (2, 1, 1, 4, 6, 5, 3, 2, 2, False, True, 0.0, False, "float64", ""),
    "no-window-odd-sizes-f32": (3, 1, 2, 4, 12, 12, 2, 0, 0, False, False, 0.0, False, "float32", ""),
    "bias-and-dropout-f64": (4, 1, 1, 4, 4, 4, 3, 1, 1, True, True, 0.25, True, "float64", ""),
    "length-128-dropout-f32": (5, 1, 1, 8, 16, 16, 2, 1, 0, True, False, 0.25, False, "float32", ""),
    "window-wider-than-sequence-f64": (6, 1, 1, 2, 4, 4, 1, 2, 2, False, False, 0.0, False, "float64", ""),
    "batch-and-heads-f32": (7, 2, 2, 4, 8, 8, 2, 1, 0, True, True, 0.0, False, "float32", ""),
    "bias-non-causal-f32": (8, 1, 2, 4, 8, 8, 2, 1, 1, False, True, 0.0, True, "float32", ""),
    "chunk-10-dim-3-f32": (9, 2, 1, 3, 10, 3, 1, 1, 1, True, True, 0.0, False, "float32", ""),
    "bias-padded-bf16": (12, 1, 2, 4, 16, 16, 2, 1, 0, True, True, 0.0, True, "bfloat16", ""),
    # NaN values: in padding they reach no real row; at a real position, only the rows that give
    # it a nonzero probability (NaN there, as on the standard path).
    "nan-in-padding-f64": (10, 2, 1, 4, 8, 4, 2, 1, 0, True, True, 0.0, False, "float64", "padding"),
    "nan-value-f32": (11, 1, 2, 4, 8, 4, 2, 1, 0, True, False, 0.0, False, "float32", "one"),
}
DETERMINISM_CASE = "length-128-dropout-f32"


@pytest.fixture(scope="module")
def results():
    """Run every case once in an interpreter subprocess; ``{case: {quantity: [error, bound]}}``."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    request = json.dumps({"cases": {name: dict(zip(FIELDS, case)) for name, case in CASES.items()},
                          "determinism": DETERMINISM_CASE})
    done = subprocess.run([sys.executable, __file__], input=request, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, f"the Triton interpreter run failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernel_matches_the_standard_path(results, case):
    found = results["cases"][case]
    assert found["triton_calls"] == 1, "the Triton kernel did not run"
    if CASES[case][FIELDS.index("garbage")] == "one":
        assert found["nan_rows"] > 0, "the NaN value reached no row: the case tests nothing"
    for what in ("out", "d_qk", "d_v"):
        error, bound = found[what]
        assert error <= bound, f"{case} {what}: Triton differs from the standard path by {error:.3g} > {bound:.3g}"


def test_triton_kernel_ran_in_the_interpreter_and_is_deterministic(results):
    assert results["interpreted"], "TRITON_INTERPRET=1 did not reach triton_lsh's kernels"
    assert results["deterministic"], "two runs gave different results or gradients"
    assert not results["supports_cpu"], "the dispatch must not pick the Triton kernel for CPU tensors"


# --------------------------------------------------------------------------- the subprocess

def _inputs(torch, rc, case):
    import numpy as np

    rng = np.random.default_rng(case["seed"])
    dtype = getattr(torch, case["dtype"])
    batch, heads, chunk, head_dim, hashes = (case[k] for k in ("batch", "heads", "chunk", "head_dim", "hashes"))
    length = case["chunks"] * chunk
    qk = torch.from_numpy(rng.standard_normal((batch, heads, length, head_dim))).to(dtype)
    v = torch.from_numpy(rng.standard_normal((batch, heads, length, head_dim))).to(dtype)
    num_buckets = rc.default_num_buckets(length, chunk)
    rotations = rc.random_rotations(case["seed"], heads, head_dim, hashes, num_buckets, like=qk)
    kwargs = dict(num_buckets=num_buckets, chunk_length=chunk, num_chunks_before=case["before"],
                  num_chunks_after=case["after"], causal=case["causal"],
                  duplicate_correction=case["duplicate_correction"])
    if case["padded"]:
        lengths = rng.integers(1, length + 1, batch)
        kwargs["attention_mask"] = torch.from_numpy(np.arange(length)[None, :] < lengths[:, None])
    if case["dropout"]:
        window = (case["before"] + 1 + case["after"]) * chunk
        shape = (batch, heads, hashes * length // chunk, chunk, window)
        kwargs.update(dropout_rate=case["dropout"], dropout_keep=torch.from_numpy(rng.random(shape) >= case["dropout"]))
    cotangent = torch.from_numpy(rng.standard_normal((batch, heads, length, head_dim))).to(dtype)
    if case["garbage"] == "padding":
        v = torch.where(kwargs["attention_mask"][:, None, :, None], v, float("nan"))
    elif case["garbage"] == "one":
        v[0, -1, length * 5 // 8, 1] = float("nan")
    return qk, v, rotations, kwargs, cotangent


def _run(torch, rc, inputs, standard):
    qk, v, rotations, kwargs, cotangent = inputs
    qk, v = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
    with rc.standard_path(standard):
        out = rc.lsh_attention(qk, v, rotations, **kwargs)
        # NaN rows (garbage cases) get a zero cotangent: then every gradient stays comparable.
        d_qk, d_v = torch.autograd.grad(out, (qk, v), torch.where(torch.isnan(out), 0.0, cotangent))
    return out.detach(), d_qk, d_v


def _error(torch, a, b):
    """Max |a - b| over the entries finite in both; inf where their NaN patterns differ."""
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    both = torch.isfinite(a) & torch.isfinite(b)
    return float((a.double() - b.double())[both].abs().max()) if both.any() else 0.0


def _worker():
    """Read the cases (JSON on stdin), print the errors and their bounds (one JSON line)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    request = json.loads(sys.stdin.read())
    import torch

    import reformer_core as rc
    from reformer_core.backends.torch import triton_lsh
    from reformer_core.backends.torch.adapter import TorchBackend
    from reformer_core.conformance.tolerances import tolerance_for

    calls = []

    def through_triton(qk, v, perm, undo, **kwargs):
        calls.append(1)
        return triton_lsh.lsh_chunk_attention(qk, v, perm, undo, **kwargs)

    TorchBackend.lsh_chunk_attention = staticmethod(through_triton)
    report = {"cases": {}, "interpreted": triton_lsh.interpreted(),
              "supports_cpu": triton_lsh.supports(torch.zeros(1))}
    for name, case in request["cases"].items():
        calls.clear()
        inputs = _inputs(torch, rc, case)
        fast = _run(torch, rc, inputs, standard=False)
        reference = _run(torch, rc, inputs, standard=True)
        tol = tolerance_for(case["dtype"], "torch", "cpu")
        found = {"triton_calls": len(calls), "nan_rows": int(torch.isnan(reference[0]).any(-1).sum())}
        for what, a, b in zip(("out", "d_qk", "d_v"), fast, reference):
            scale = float(torch.nan_to_num(b, nan=0.0).abs().max())
            found[what] = [_error(torch, a, b), tol.bound("forward" if what == "out" else "grad", scale)]
        report["cases"][name] = found
        if name == request["determinism"]:
            again = _run(torch, rc, inputs, standard=False)
            report["deterministic"] = all(torch.equal(a, b) for a, b in zip(fast, again))
    print(json.dumps(report))


if __name__ == "__main__":
    _worker()

"""The torch fast path of LSH attention (backends/torch/lsh_kernel.py) against the standard
Array-API path: forward and both gradients, over drawn shapes, rounds, masks and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the torch fast path needs PyTorch (pip install 'reformer-core[torch]')")

import reformer_core as rc  # noqa: E402
from reformer_core.conformance.tolerances import tolerance_for  # noqa: E402
from lsh_cases import lsh_case  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(*case, dtype):
    return lsh_case(*case, floats=lambda x: torch.from_numpy(x).to(dtype), bools=torch.from_numpy)


def _run(qk, v, rotations, kwargs, cotangent, standard):
    qk, v = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
    with rc.standard_path(standard):
        out = rc.lsh_attention(qk, v, rotations, **kwargs)
        d_qk, d_v = torch.autograd.grad(out, (qk, v), cotangent)
    return out.detach(), d_qk, d_v


def _close(fast, standard, dtype, what):
    tol = tolerance_for(dtype, "torch", "cpu")
    scale = float(standard.abs().max())
    error = float((fast.double() - standard.double()).abs().max())
    bound = tol.bound("forward" if what == "out" else "grad", scale)
    assert error <= bound, f"{what}: fast path differs from the standard path by {error:.3g} > {bound:.3g}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 3), chunks=st.integers(2, 6),
       chunk=st.sampled_from([2, 4, 8]), head_dim=st.sampled_from([2, 4, 8]), num_hashes=st.integers(1, 4),
       before=st.integers(0, 2), after=st.integers(0, 2), causal=st.booleans(), padded=st.booleans(),
       dropout=st.sampled_from([0.0, 0.0, 0.25]), duplicate_correction=st.booleans(),
       dtype=st.sampled_from(["float64", "float64", "float32"]))
def test_fast_path_matches_the_standard_path(seed, batch, heads, chunks, chunk, head_dim, num_hashes, before, after,
                                             causal, padded, dropout, duplicate_correction, dtype):
    args = _inputs(seed, batch, heads, chunks, chunk, head_dim, num_hashes, before, after, causal, padded, dropout,
                   duplicate_correction, dtype=DTYPES[dtype])
    for what, fast, standard in zip(("out", "d_qk", "d_v"), _run(*args, standard=False), _run(*args, standard=True)):
        _close(fast, standard, dtype, what)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_path_in_low_precision_stays_within_the_table(dtype):
    args = _inputs(3, 1, 2, 8, 16, 16, 2, 1, 0, True, True, 0.0, False, dtype=DTYPES[dtype])
    for what, fast, standard in zip(("out", "d_qk", "d_v"), _run(*args, standard=False), _run(*args, standard=True)):
        _close(fast, standard, dtype, what)


def test_the_fast_path_is_the_default_and_the_switch_turns_it_off(monkeypatch):
    from reformer_core.backends.torch import lsh_kernel

    calls = []
    original = lsh_kernel.lsh_chunk_attention
    monkeypatch.setattr(lsh_kernel, "lsh_chunk_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    qk, v, rotations, kwargs, _ = _inputs(0, 1, 1, 4, 4, 4, 2, 1, 0, True, False, 0.0, False, dtype=torch.float64)
    rc.lsh_attention(qk, v, rotations, **kwargs)
    assert calls == [1]
    with rc.standard_path():
        assert rc.uses_standard_path()
        rc.lsh_attention(qk, v, rotations, **kwargs)
        with rc.standard_path(False):
            rc.lsh_attention(qk, v, rotations, **kwargs)
    assert calls == [1, 1] and not rc.uses_standard_path()
    with pytest.raises(TypeError, match="bool"):
        with rc.standard_path("yes"):
            pass


def test_blocks_split_long_sequences_without_changing_the_result(monkeypatch):
    from reformer_core.backends.torch import lsh_kernel

    args = _inputs(5, 2, 2, 16, 8, 8, 3, 1, 1, True, True, 0.0, True, dtype=torch.float64)
    whole = _run(*args, standard=False)
    monkeypatch.setattr(lsh_kernel, "BLOCK_BYTES", 8 * 8 * 3 * 8 * 3)  # three chunks per block, one head at a time
    for a, b in zip(whole, _run(*args, standard=False)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_fast_path_gradients_pass_gradcheck():
    args = _inputs(1, 1, 2, 3, 4, 4, 2, 1, 1, True, True, 0.0, True, dtype=torch.float64)
    qk, v, rotations, kwargs, _ = args
    # Hashing is held fixed by the core (no gradient), so perturbing qk must not change buckets:
    # compare against finite differences with the buckets of the unperturbed input.
    buckets = rc.hash_vectors(qk, rotations, kwargs["num_buckets"], attention_mask=kwargs.get("attention_mask"))
    from reformer_core._attention.lsh import lsh_with_buckets
    from array_api_compat import torch as xp

    keep = kwargs["attention_mask"]
    options = {k: kwargs[k] for k in ("chunk_length", "num_chunks_before", "num_chunks_after", "causal",
                                       "duplicate_correction")}

    def fn(qk, v):
        return lsh_with_buckets(xp, qk, v, buckets, keep, **options)[0]

    assert torch.autograd.gradcheck(fn, (qk.clone().requires_grad_(True), v.clone().requires_grad_(True)))


def test_model_under_torch_compile_has_no_graph_break_in_attention():
    pytest.importorskip("torch._dynamo")
    qk, v, rotations, kwargs, _ = _inputs(2, 1, 2, 4, 4, 4, 2, 1, 0, True, True, 0.0, False, dtype=torch.float32)

    def attention(qk, v):
        return rc.lsh_attention(qk, v, rotations, **kwargs)

    explanation = torch._dynamo.explain(attention)(qk, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(attention, fullgraph=True)
    torch.testing.assert_close(compiled(qk, v), attention(qk, v), rtol=1e-5, atol=1e-6)


def test_backward_keeps_no_per_chunk_probabilities():
    """What the Function saves grows linearly with the length: O(rows x head_dim), not
    O(rows x window)."""
    saved, head_dim, chunk = {}, 8, 32
    for chunks in (4, 16):
        qk, v, rotations, kwargs, _ = _inputs(0, 1, 2, chunks, chunk, head_dim, 2, 1, 0, True, False, 0.0, False,
                                              dtype=torch.float32)
        qk.requires_grad_(True)
        out = rc.lsh_attention(qk, v, rotations, **kwargs)
        node = out.grad_fn
        while node is not None and "SortedChunkAttention" not in type(node).__name__:
            node = node.next_functions[0][0]
        assert node is not None, "the fast path did not run"
        saved[chunks] = sum(t.numel() * t.element_size() for t in node.saved_tensors if t is not None)
    rows = 2 * 2 * 16 * chunk  # heads x hashes x length
    assert saved[16] <= 4.5 * saved[4]  # linear in the length (4x), plus the halo
    # q, k, v and the per-round outputs (float32), a few int64 indices per row: O(rows x head_dim);
    # one probability per (row, window slot) would be rows x 64 x 4 bytes, more than this bound.
    assert saved[16] <= rows * (5 * head_dim * 4 + 6 * 8)

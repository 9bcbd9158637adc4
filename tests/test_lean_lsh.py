"""The memory-lean recompute path of LSH attention's hand-written VJP (``_attention/lean.py``)
against the standard path it replaces (``lsh_with_buckets`` under ``standard_path()``):
forward and both gradients, over drawn shapes, rounds, masks, dropout, duplicate correction
and block sizes; on NumPy, array-api-strict, in 16-bit; and its memory."""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reformer_core as rc
from reformer_core._attention import lean, lsh
from reformer_core.conformance.tolerances import tolerance_for
from lsh_cases import lsh_case


@contextlib.contextmanager
def block_bytes(value):
    """Set ``lean.BLOCK_BYTES`` inside the block (None: leave the default)."""
    previous = lean.BLOCK_BYTES
    lean.BLOCK_BYTES = previous if value is None else value
    try:
        yield
    finally:
        lean.BLOCK_BYTES = previous


def _vjp(qk, v, rotations, kwargs, cotangent, *, standard, to_numpy=np.asarray):
    with rc.standard_path(standard):
        out, pullback = rc.lsh_attention_vjp(qk, v, rotations, **kwargs)
        d_qk, d_v = pullback(cotangent)
    return tuple(to_numpy(x) for x in (out, d_qk, d_v))


def _numpy_case(*case, dtype=np.float64):
    return lsh_case(*case, floats=lambda x: x.astype(dtype), bools=lambda x: x)


def _assert_close(lean_results, standard_results, rtol=None, dtype=None):
    for what, got, expected in zip(("out", "d_qk", "d_v"), lean_results, standard_results):
        assert got.dtype == expected.dtype, what
        scale = float(np.max(np.abs(expected.astype(np.float64))))
        error = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
        if rtol is not None:  # plus an absolute floor: a gradient may cancel to round-off (inputs are O(1))
            bound = rtol * scale + 1e-13
        else:
            bound = tolerance_for(dtype, "numpy", "cpu").bound("forward" if what == "out" else "grad", scale)
        assert error <= bound, f"{what}: lean path differs from the standard path by {error:.3g} > {bound:.3g}"


CASES = dict(seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 2), chunks=st.integers(2, 6),
             chunk=st.sampled_from([2, 3, 4]), head_dim=st.sampled_from([2, 5]), num_hashes=st.integers(1, 4),
             before=st.integers(0, 2), after=st.integers(0, 2), causal=st.booleans(), padded=st.booleans(),
             dropout=st.sampled_from([0.0, 0.25]), duplicate_correction=st.booleans())
# None: the default (one block); 1: every block as small as the window allows; else a few chunks.
BLOCKS = st.sampled_from([None, 1, 200, 1500])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=BLOCKS, **CASES)
def test_lean_matches_the_standard_path_in_float64(blocks, **case):
    args = _numpy_case(*case.values())
    with block_bytes(blocks):
        got = _vjp(*args, standard=False)
    _assert_close(got, _vjp(*args, standard=True), rtol=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=BLOCKS, **CASES)
def test_lean_matches_the_standard_path_in_float32(blocks, **case):
    args = _numpy_case(*case.values(), dtype=np.float32)
    with block_bytes(blocks):
        got = _vjp(*args, standard=False)
    _assert_close(got, _vjp(*args, standard=True), dtype="float32")


@given(rows=st.integers(1, 6), chunks=st.integers(1, 40), width=st.integers(1, 5), budget=st.integers(1, 64))
def test_blocks_tile_every_row_and_chunk(rows, chunks, width, budget):
    """Row groups cover the rows; each row's spans cover its chunks in order, every span at least
    ``width - 1`` long when there are several, and within the budget unless that forces it."""
    with block_bytes(budget):
        groups = lean._plan(rows, chunks, 1, width)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups) and groups[0][0] == 0 and groups[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    for r0, r1, spans in groups:
        assert spans[0][0] == 0 and spans[-1][1] == chunks and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if len(spans) > 1:
            assert r1 - r0 == 1 and all(e - s >= width - 1 for s, e in spans)
            assert all(e - s <= max(budget, width - 1) + max(width - 2, 0) for s, e in spans)
        else:
            assert (r1 - r0) * chunks <= budget or r1 - r0 == 1


@pytest.mark.parametrize("before, after, num_hashes", [(2, 2, 1), (1, 2, 2), (2, 0, 1)])
def test_windows_wrapping_onto_the_same_chunk_twice(before, after, num_hashes):
    """Two chunks in all, a window of up to five: chunks repeat within one window."""
    args = _numpy_case(4, 2, 2, 2, 3, 4, num_hashes, before, after, True, True, 0.25, True)
    for blocks in (None, 1):
        with block_bytes(blocks):
            got = _vjp(*args, standard=False)
        _assert_close(got, _vjp(*args, standard=True), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_values_and_16_bit_inputs_follow_attend(dtype):
    """NaN/inf value rows reach (as NaN) only the queries giving them a nonzero probability;
    16-bit inputs are computed in float32 and come back in their dtype."""
    qk, v, rotations, kwargs, cotangent = _numpy_case(3, 1, 2, 4, 4, 5, 2, 1, 1, True, True, 0.2, True, dtype=dtype)
    v = v.copy()
    v[0, 1, 5, 2], v[0, 0, 9, 0] = np.nan, np.inf
    with block_bytes(1):
        got = _vjp(qk, v, rotations, kwargs, cotangent, standard=False)
    expected = _vjp(qk, v, rotations, kwargs, cotangent, standard=True)
    assert np.isnan(expected[0]).any() and not np.isnan(expected[0]).all()
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    finite = [np.nan_to_num(x) for x in got], [np.nan_to_num(x) for x in expected]
    _assert_close(*finite, dtype=np.dtype(dtype).name)


def test_the_lean_path_is_the_default_and_the_switch_turns_it_off(monkeypatch):
    calls = []
    original = lsh.lean_lsh_attention
    monkeypatch.setattr(lsh, "lean_lsh_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = _numpy_case(0, 1, 1, 4, 4, 4, 2, 1, 0, True, False, 0.0, False)
    _vjp(*args, standard=False)
    assert calls == [1]
    _vjp(*args, standard=True)
    rc.lsh_attention(*args[:3], **args[3])  # no pullback: the standard (or native) forward
    assert calls == [1]


def test_a_misshapen_dropout_mask_is_refused_before_any_block_runs():
    qk, v, rotations, kwargs, _ = _numpy_case(0, 1, 1, 4, 4, 4, 2, 1, 0, True, False, 0.25, False)
    kwargs["dropout_keep"] = kwargs["dropout_keep"][..., :-1]
    with pytest.raises(ValueError, match="dropout_keep has shape"):
        rc.lsh_attention_vjp(qk, v, rotations, **kwargs)


@pytest.mark.parametrize("duplicate_correction", [False, True])
def test_lean_on_array_api_strict(duplicate_correction):
    pytest.importorskip("array_api_strict")
    with rc.use_backend("strict", device="device1") as strict:
        for causal, padded, dropout in ((True, True, 0.25), (False, False, 0.0)):
            case = (7, 2, 2, 4, 4, 3, 3, 1, 1, causal, padded, dropout, duplicate_correction)
            expected = _vjp(*_numpy_case(*case), standard=True)
            args = lsh_case(*case, floats=strict.from_numpy, bools=strict.from_numpy)
            with block_bytes(1):
                got = _vjp(*args, standard=False, to_numpy=strict.to_numpy)
            _assert_close(got, expected, rtol=1e-12)


def _peak_bytes(length, standard):
    qk, v, rotations, kwargs, cotangent = _numpy_case(0, 1, 2, length // 16, 16, 16, 2, 1, 0, True, False, 0.0,
                                                      False, dtype=np.float32)
    tracemalloc.start()
    try:
        _vjp(qk, v, rotations, kwargs, cotangent, standard=standard)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_lean_memory_grows_linearly_and_stays_below_the_standard_path():
    with block_bytes(64 << 10):
        short, long = _peak_bytes(1024, False), _peak_bytes(4096, False)
    standard = _peak_bytes(4096, True)
    assert long / short < 5, (short, long)
    assert standard / long > 2, (standard, long)  # measured: about 3.1

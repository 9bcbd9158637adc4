"""The JAX fast path of LSH attention (backends/jax/lsh_kernel.py) against the standard
Array-API path: forward and both gradients, jitted and eager, over drawn shapes, rounds,
masks and dropout; the Pallas forward in interpret mode; what the backward keeps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax", reason="the JAX fast path needs JAX (pip install 'reformer-core[jax]')")
import jax.numpy as jnp  # noqa: E402

import reformer_core as rc  # noqa: E402
from reformer_core.backends.jax import lsh_kernel  # noqa: E402
from reformer_core.conformance.tolerances import tolerance_for  # noqa: E402
from lsh_cases import lsh_case  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64")

X64 = bool(jax.config.jax_enable_x64)
DTYPES = ["float32", "float64"] if X64 else ["float32"]


def _inputs(*case):
    *case, dtype = case
    return lsh_case(*case, floats=lambda x: jnp.asarray(x, dtype=getattr(jnp, dtype)), bools=jnp.asarray)


def _value_and_grads(qk, v, rotations, kwargs, cotangent):
    out, pullback = jax.vjp(lambda q, w: rc.lsh_attention(q, w, rotations, **kwargs), qk, v)
    return (out, *pullback(cotangent))


def _both_paths(args, *, jit):
    """``(fast, standard)``, each ``(out, d_qk, d_v)``. Jitted, both paths are traced in one
    function (the switch is read at trace time), so one compilation serves the comparison."""
    def both(qk, v, cotangent):
        with rc.standard_path(False):
            fast = _value_and_grads(qk, v, args[2], args[3], cotangent)
        with rc.standard_path(True):
            standard = _value_and_grads(qk, v, args[2], args[3], cotangent)
        return fast, standard

    inputs = (args[0], args[1], args[4])
    return _compile(both, *inputs)(*inputs) if jit else both(*inputs)


# Compiling at XLA's lowest optimisation level halves the tests' compile time (most of their run
# time); the numerics stay within the tolerance table.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def _assert_close(fast, standard, dtype):
    tol = tolerance_for(dtype, "jax", "cpu")
    for what, a, b in zip(("out", "d_qk", "d_v"), fast, standard):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        bound = tol.bound("forward" if what == "out" else "grad", float(np.abs(b).max()))
        error = float(np.abs(a - b).max())
        assert error <= bound, f"{what}: fast path differs from the standard path by {error:.3g} > {bound:.3g}"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), heads=st.integers(1, 2), chunks=st.integers(2, 5),
       chunk=st.sampled_from([2, 4]), head_dim=st.sampled_from([2, 4, 8]), num_hashes=st.integers(1, 4),
       before=st.integers(0, 2), after=st.integers(0, 2), causal=st.booleans(), padded=st.booleans(),
       dropout=st.sampled_from([0.0, 0.25]), duplicate_correction=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_jitted_fast_path_matches_the_standard_path(seed, batch, heads, chunks, chunk, head_dim, num_hashes, before,
                                                    after, causal, padded, dropout, duplicate_correction, dtype):
    args = _inputs(seed, batch, heads, chunks, chunk, head_dim, num_hashes, before, after, causal, padded, dropout,
                   duplicate_correction, dtype)
    _assert_close(*_both_paths(args, jit=True), dtype)


def test_eager_fast_path_matches_the_standard_path():
    qk, v, rotations, kwargs, cotangent = args = _inputs(7, 2, 2, 4, 4, 4, 3, 1, 1, True, True, 0.25, True,
                                                         "float32")
    fast = _value_and_grads(*args)  # op by op, jax.vjp through the custom_vjp

    def standard(qk, v, cotangent):
        with rc.standard_path():
            return _value_and_grads(qk, v, rotations, kwargs, cotangent)

    _assert_close(fast, _compile(standard, qk, v, cotangent)(qk, v, cotangent), "float32")


@pytest.mark.skipif(not X64, reason="float64 needs JAX's x64 mode (run with JAX_ENABLE_X64=1)")
@pytest.mark.parametrize("causal", [True, False])
def test_float64_fast_path_matches_the_standard_path(causal):
    args = _inputs(11, 1, 2, 5, 4, 4, 2, 2, 1, causal, True, 0.25, True, "float64")
    _assert_close(*_both_paths(args, jit=True), "float64")


def test_bfloat16_fast_path_stays_within_the_table():
    args = _inputs(3, 1, 2, 8, 16, 16, 2, 1, 0, True, True, 0.0, False, "bfloat16")
    fast, standard = _both_paths(args, jit=True)
    assert all(x.dtype == jnp.bfloat16 for x in (*fast, *standard))
    _assert_close(fast, standard, "bfloat16")


def test_the_fast_path_is_the_default_and_the_switch_turns_it_off(monkeypatch):
    calls = []
    original = lsh_kernel.lsh_chunk_attention
    monkeypatch.setattr(lsh_kernel, "lsh_chunk_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    qk, v, rotations, kwargs, _ = _inputs(0, 1, 1, 4, 4, 4, 2, 1, 0, True, False, 0.0, False, "float32")
    with rc.standard_path():
        jax.jit(lambda q, w: rc.lsh_attention(q, w, rotations, **kwargs)).lower(qk, v)  # traced here: standard
    assert calls == []
    jax.jit(lambda q, w: rc.lsh_attention(q, w, rotations, **kwargs)).lower(qk, v)
    assert calls == [1]
    from reformer_core.backends.jax.adapter import JaxBackend

    assert JaxBackend.native_lsh_attention


def test_blocks_split_long_sequences_without_changing_the_result(monkeypatch):
    # 3 hashes x 14 chunks = 42 sorted chunks: blocks of 4 leave a last block overlapping the one before.
    args = _inputs(5, 2, 2, 14, 4, 4, 3, 1, 1, True, True, 0.25, True, "float32")
    qk, v, rotations, kwargs, cotangent = args

    def step(qk, v, cotangent):
        return _value_and_grads(qk, v, rotations, kwargs, cotangent)

    whole = _compile(step, qk, v, cotangent)(qk, v, cotangent)
    monkeypatch.setattr(lsh_kernel, "BLOCK_BYTES", 4 * (2 * 2 * 4 * 12 * 4))  # four chunks per block
    blocked = _compile(step, qk, v, cotangent)(qk, v, cotangent)
    for a, b in zip(whole, blocked):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_fast_path_under_vmap_matches_the_batched_call():
    qk, v, rotations, kwargs, cotangent = _inputs(9, 3, 2, 4, 4, 4, 2, 1, 0, True, False, 0.0, True, "float32")

    def one(q, w):
        return rc.lsh_attention(q[None], w[None], rotations, **kwargs)[0]

    batched = jax.jit(jax.vmap(lambda q, w: jax.vjp(one, q, w)[1](jnp.ones_like(q))))(qk, v)
    expected = jax.jit(lambda q, w: jax.vjp(lambda a, b: rc.lsh_attention(a, b, rotations, **kwargs), q, w)[1](
        jnp.ones_like(q)))(qk, v)
    for a, b in zip(batched, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [
    (1, 2, 2, 5, 4, 8, 2, 1, 0, True, True, 0.25, True),   # causal, padding, dropout, duplicate correction
    (2, 1, 3, 4, 4, 4, 1, 2, 1, False, False, 0.0, False),  # two chunks back, one forward, one round
])
def test_pallas_forward_in_interpret_mode_matches_the_standard_path(monkeypatch, case):
    args = _inputs(*case, "float32")
    monkeypatch.setattr(lsh_kernel, "KERNEL", "pallas-interpret")
    calls = []
    original = lsh_kernel._forward_pallas
    monkeypatch.setattr(lsh_kernel, "_forward_pallas", lambda *a, **k: calls.append(k) or original(*a, **k))
    _assert_close(*_both_paths(args, jit=True), "float32")
    assert calls and all(call["interpret"] for call in calls)


def test_kernel_choice():
    x = jnp.zeros((2, 16))
    assert lsh_kernel.kernel_choice(x, chunk_length=32) == "jnp"  # Pallas is opt-in until checked on a GPU
    assert lsh_kernel.kernel_choice(x, "pallas", chunk_length=32) == "pallas"
    assert lsh_kernel.kernel_choice(jnp.zeros((2, 12)), "pallas", chunk_length=32) == "jnp"  # does not fit
    assert lsh_kernel.kernel_choice(x, "pallas-interpret") == "pallas-interpret"
    with pytest.raises(ValueError, match="unknown LSH kernel"):
        lsh_kernel.kernel_choice(x, "triton")


def _residual_bytes(chunks, chunk, head_dim, standard):
    """Bytes of what ``jax.vjp`` keeps for the pullback (its residuals: the pullback's leaves)."""
    qk, v, rotations, kwargs, _ = _inputs(0, 1, 2, chunks, chunk, head_dim, 2, 1, 0, True, False, 0.0, False,
                                          "float32")

    def forward(qk, v):
        return jax.vjp(lambda a, b: rc.lsh_attention(a, b, rotations, **kwargs), qk, v)

    with rc.standard_path(standard):
        _, pullback = _compile(forward, qk, v)(qk, v)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(pullback))


def _temp_bytes(chunks, chunk, head_dim):
    """Temporary bytes of the compiled forward+backward of the fast step after hashing."""
    from reformer_core._attention.lsh import lsh_with_buckets

    qk, v, rotations, kwargs, cotangent = _inputs(0, 1, 2, chunks, chunk, head_dim, 2, 1, 0, True, False, 0.0,
                                                  False, "float32")
    buckets = rc.hash_vectors(qk, rotations, kwargs["num_buckets"])

    def step(qk, v, buckets, cotangent):
        def attention(qk, v):
            return lsh_with_buckets(jnp, qk, v, buckets, None, chunk_length=chunk, num_chunks_before=1,
                                    num_chunks_after=0, causal=True)[0]

        out, pullback = jax.vjp(attention, qk, v)
        return out, *pullback(cotangent)

    return _compile(step, qk, v, buckets, cotangent).memory_analysis().temp_size_in_bytes


def test_backward_keeps_no_per_chunk_probabilities(monkeypatch):
    """What ``jax.vjp`` keeps grows linearly with the length, O(rows x head_dim), below one
    probability per (sorted row, window slot); the compiled forward+backward's temporaries
    grow linearly too (the blocks' logits are recomputed, never stored)."""
    chunk, head_dim = 32, 8
    kept = {chunks: _residual_bytes(chunks, chunk, head_dim, standard=False) for chunks in (16, 64)}
    rows = 2 * 2 * 64 * chunk  # heads x hashes x length
    probabilities = rows * 2 * chunk * 4  # one float32 per window slot (two chunks of 32)
    assert kept[64] <= 4.1 * kept[16], kept
    # qk, keys, v, the per-round outputs and log-sum-exps (float32), perm and undo (int32/int64).
    assert kept[64] <= rows * (4 * head_dim * 4 + 2 * 4 + 2 * 8), kept
    assert kept[64] < probabilities / 2
    # The bound bites: the standard path, differentiated by autodiff, keeps the probabilities.
    assert _residual_bytes(64, chunk, head_dim, standard=True) > probabilities
    monkeypatch.setattr(lsh_kernel, "BLOCK_BYTES", 64 << 10)  # blocks of four chunks
    temp = {chunks: _temp_bytes(chunks, chunk, head_dim) for chunks in (16, 64)}
    assert temp[64] <= 4.6 * temp[16], temp

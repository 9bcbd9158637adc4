"""Inputs that used to give a silently wrong number (issue 12, findings 1-4 and 10): integer
limits of the sort key, autocast, garbage at masked positions, float16 range, keyword typos."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import reformer_core as rc
from reformer_core._attention.attend import shared_qk_keys
from reformer_core._attention.sorting import sort_by_bucket
from reformer_core.conformance.tolerances import tolerance_for

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch (pip install 'reformer-core[torch]')")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="needs JAX (pip install 'reformer-core[jax]')")


def _normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# --- 1. the LSH sort key never overflows -------------------------------------------------


def _int32_buckets(framework, host):
    if framework == "numpy":
        return np.asarray(host, dtype=np.int32)
    if framework == "torch":
        import torch

        return torch.from_numpy(host.astype(np.int32))
    import jax.numpy as jnp

    return jnp.asarray(host, dtype=jnp.int32)


@pytest.mark.parametrize("framework", ["numpy", pytest.param("torch", marks=needs_torch),
                                       pytest.param("jax", marks=needs_jax)])
def test_sort_by_bucket_is_exact_where_bucket_times_length_passes_int32(framework):
    # 4 rounds of 2**19 buckets at L=2048: bucket * length + position reaches 2**32.
    length, per_round, rounds = 2048, 1 << 19, 4
    rng = np.random.default_rng(0)
    host = rng.integers(0, per_round, (1, 2, rounds, length)) + (np.arange(rounds) * per_round)[:, None]
    buckets = _int32_buckets(framework, host)
    from array_api_compat import array_namespace

    perm, undo = sort_by_bucket(array_namespace(buckets), buckets)
    flat = host.reshape(1, 2, rounds * length)
    expected = np.argsort(flat, axis=-1, kind="stable")  # (bucket, flat index) order
    np.testing.assert_array_equal(np.asarray(perm), expected)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(perm), np.asarray(undo), -1),
                                  np.broadcast_to(np.arange(rounds * length), flat.shape))


@needs_jax
def test_jax_lsh_attention_with_many_buckets_matches_numpy():
    import jax.numpy as jnp

    # (1024, 512) factors: 524289 bucket ids per round with padding; 4 rounds at L=1024 pass 2**31.
    length, heads, head_dim, hashes, buckets = 1024, 1, 8, 4, (1024, 512)
    qk, v = _normal(1, 1, heads, length, head_dim), _normal(2, 1, heads, length, head_dim)
    mask = np.arange(length)[None, :] < 1000
    rotations = rc.random_rotations(0, heads, head_dim, hashes, buckets, backend="numpy", dtype="float32")
    kwargs = dict(num_buckets=buckets, chunk_length=32, causal=True)
    expected = rc.lsh_attention(qk.astype(np.float32), v.astype(np.float32), rotations, attention_mask=mask, **kwargs)
    actual = rc.lsh_attention(jnp.asarray(qk, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(rotations),
                              attention_mask=jnp.asarray(mask), **kwargs)
    np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-4)


# --- 2. autocast: mask constants follow the logits' dtype ---------------------------------


def _torch_inputs(length=256, heads=2, head_dim=16, seed=0):
    import torch

    qk = torch.from_numpy(_normal(seed, 1, heads, length, head_dim)).float()
    v = torch.from_numpy(_normal(seed + 1, 1, heads, length, head_dim)).float()
    mask = torch.arange(length)[None, :] < length - 37
    return qk, v, mask


@needs_torch
@pytest.mark.parametrize("kind", ["full", "lsh", "local"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_gives_finite_outputs_and_gradients(kind, dtype):
    import torch

    qk, v, mask = _torch_inputs()
    rotations = rc.random_rotations(0, 2, 16, 2, 8, like=qk)

    def run(qk, v, standard=True):
        if kind == "full":
            return rc.full_attention(qk, v, causal=True, attention_mask=mask)
        if kind == "local":
            return rc.local_attention(qk, qk, v, chunk_length=32, causal=True, attention_mask=mask)
        with rc.standard_path(standard):
            return rc.lsh_attention(qk, v, rotations, num_buckets=8, chunk_length=32, causal=True,
                                    attention_mask=mask)

    tol = tolerance_for(dtype, "torch", "cpu")
    with torch.autocast("cpu", dtype=getattr(torch, dtype)):
        # LSH hashes in the autocast dtype, so its buckets may differ from float32's: the
        # reference is the standard path under the same autocast.
        reference = run(qk, v).float() if kind == "lsh" else None
    reference = run(qk, v) if reference is None else reference
    for standard in [True, False] if kind == "lsh" else [True]:
        x, y = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            out = run(x, y, standard)
        d_qk, d_v = torch.autograd.grad(out.float().sum(), (x, y))
        assert torch.isfinite(out).all() and torch.isfinite(d_qk).all() and torch.isfinite(d_v).all()
        error = float((out.detach().float() - reference.detach()).abs().max())
        assert error <= tol.bound("forward", float(reference.abs().max())), error


# --- 3. garbage at masked positions never reaches an output ---------------------------------


def _attention(kind, qk, v, mask, causal, rotations=None, standard=True):
    if kind == "full":
        return rc.full_attention(qk, v, causal=causal, attention_mask=mask)
    if kind == "local":
        return rc.local_attention(qk, qk, v, chunk_length=8, causal=causal, attention_mask=mask)
    with rc.standard_path(standard):
        return rc.lsh_attention(qk, v, rotations, num_buckets=4, chunk_length=8, causal=causal, attention_mask=mask)


KINDS = ["full", "local", "lsh", "lsh-fast"]


@pytest.mark.parametrize("framework", ["numpy", pytest.param("torch", marks=needs_torch)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
def test_garbage_values_at_padded_positions_do_not_reach_real_rows(framework, kind, garbage):
    length, real = 32, 27
    qk, v = _normal(3, 2, 2, length, 4), _normal(4, 2, 2, length, 4)
    mask = np.arange(length)[None, :].repeat(2, 0) < real
    dirty = v.copy()
    dirty[:, :, real:] = garbage
    convert = (lambda x: x) if framework == "numpy" else __import__("torch").from_numpy
    rotations = rc.random_rotations(0, 2, 4, 2, 4, like=convert(qk))
    name, fast = kind.split("-")[0], kind.endswith("fast")
    clean_out = np.asarray(_attention(name, convert(qk), convert(np.where(mask[:, None, :, None], v, 0.0)),
                                      convert(mask), False, rotations, not fast))
    out = np.asarray(_attention(name, convert(qk), convert(dirty), convert(mask), False, rotations, not fast))
    assert np.isfinite(out[:, :, :real]).all()
    np.testing.assert_allclose(out[:, :, :real], clean_out[:, :, :real], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("framework", ["numpy", pytest.param("torch", marks=needs_torch)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_value_reaches_only_the_queries_that_attend_to_it(framework, kind):
    # Causal: a NaN value at a real position j is masked for every query before j.
    length, j = 32, 20
    qk, v = _normal(5, 1, 2, length, 4), _normal(6, 1, 2, length, 4)
    dirty = v.copy()
    dirty[0, 1, j, 2] = np.nan
    convert = (lambda x: x) if framework == "numpy" else __import__("torch").from_numpy
    rotations = rc.random_rotations(1, 2, 4, 2, 4, like=convert(qk))
    name, fast = kind.split("-")[0], kind.endswith("fast")
    clean = np.asarray(_attention(name, convert(qk), convert(v), None, True, rotations, not fast))
    out = np.asarray(_attention(name, convert(qk), convert(dirty), None, True, rotations, not fast))
    np.testing.assert_allclose(out[:, :, :j], clean[:, :, :j], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[:, 0], clean[:, 0])  # another head never sees it
    # Rows from j on that give it a nonzero probability are NaN, never a finite wrong number; the
    # others are exactly what they were (shared-QK rows meet their own position only when forced).
    later, clean_later = out[0, 1, j:], clean[0, 1, j:]
    poisoned = np.isnan(later).all(-1)
    assert poisoned.any()
    np.testing.assert_allclose(later[~poisoned], clean_later[~poisoned], rtol=1e-12, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("hashes", [1, 2])
@pytest.mark.parametrize("standard", [True, False])
def test_gradients_stay_finite_with_nan_garbage_in_padding(standard, hashes):
    import torch

    length, real = 32, 25
    qk = torch.from_numpy(_normal(7, 1, 2, length, 4))
    v = torch.from_numpy(_normal(8, 1, 2, length, 4))
    v[:, :, real:] = float("nan")
    mask = torch.arange(length)[None, :] < real
    rotations = rc.random_rotations(0, 2, 4, hashes, 4, like=qk)
    qk.requires_grad_(True)
    v.requires_grad_(True)
    with rc.standard_path(standard):
        out = rc.lsh_attention(qk, v, rotations, num_buckets=4, chunk_length=8, causal=True, attention_mask=mask)
    d_qk, d_v = torch.autograd.grad(out[:, :, :real].sum(), (qk, v))
    assert torch.isfinite(d_qk).all() and torch.isfinite(d_v[:, :, :real]).all()


def test_numpy_pullback_stays_finite_with_nan_garbage_in_padding():
    length, real = 32, 25
    qk, v = _normal(7, 1, 2, length, 4), _normal(8, 1, 2, length, 4)
    v[:, :, real:] = np.nan
    mask = np.arange(length)[None, :] < real
    rotations = rc.random_rotations(0, 2, 4, 2, 4, backend="numpy", dtype="float64")
    out, pullback = rc.lsh_attention_vjp(qk, v, rotations, num_buckets=4, chunk_length=8, causal=True,
                                         attention_mask=mask)
    d_out = np.where(mask[:, None, :, None], 1.0, 0.0) * np.ones_like(out)
    d_qk, d_v = pullback(d_out)
    assert np.isfinite(out[:, :, :real]).all() and np.isfinite(d_qk).all() and np.isfinite(d_v[:, :, :real]).all()


# --- 4. float16 range: key norms and the self constant ----------------------------------------


@pytest.mark.parametrize("framework", ["numpy", pytest.param("torch", marks=needs_torch)])
def test_float16_key_normalisation_does_not_overflow(framework):
    x = _normal(9, 1, 1, 8, 16) * 1000.0  # x * x overflows float16 (max 65504)
    wide = shared_qk_keys(np, x)
    if framework == "numpy":
        half = shared_qk_keys(np, x.astype(np.float16))
    else:
        import torch
        from array_api_compat import torch as xp

        half = shared_qk_keys(xp, torch.from_numpy(x).half()).numpy()
    assert half.dtype == np.float16 and np.isfinite(half).all()
    np.testing.assert_allclose(half.astype(np.float64), wide, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("framework", ["numpy", pytest.param("torch", marks=needs_torch)])
@pytest.mark.parametrize("kind", ["full", "lsh", "lsh-fast"])
def test_float16_logits_far_below_zero_still_beat_the_self_constant(framework, kind):
    # |q| = 2000: real logits near -2000 would lose to a float16 self constant of -1e3.
    length = 16
    base = _normal(10, 1, 1, length, 8)
    qk = base / np.linalg.norm(base, axis=-1, keepdims=True) * 2000.0
    qk[..., 1::2, :] = -qk[..., ::2, :]  # every odd token points away from the even one before it
    v = _normal(11, 1, 1, length, 8)
    convert = (lambda x: x.astype(np.float16)) if framework == "numpy" else (
        lambda x: __import__("torch").from_numpy(x).half())
    name, fast = kind.split("-")[0], kind.endswith("fast")
    rotations = rc.random_rotations(0, 1, 8, 1, 4, like=convert(qk))
    half = np.asarray(_attention(name, convert(qk), convert(v), None, True, rotations, not fast), dtype=np.float64)
    rot64 = np.asarray(rotations, dtype=np.float64)
    expected = _attention(name, np.asarray(convert(qk), dtype=np.float64), np.asarray(convert(v), dtype=np.float64),
                          None, True, rot64, True)
    np.testing.assert_allclose(half, expected, atol=1e-2 * np.abs(expected).max())


# --- 10. keyword typos and no-op arguments raise ---------------------------------------------


def test_attention_vjps_refuse_unknown_keywords():
    qk, v = _normal(0, 1, 1, 8, 4), _normal(1, 1, 1, 8, 4)
    with pytest.raises(TypeError, match="casual"):
        rc.full_attention_vjp(qk, v, casual=True)
    with pytest.raises(TypeError, match="casual"):
        rc.local_attention_vjp(qk, qk, v, chunk_length=4, casual=True)
    rotations = rc.random_rotations(0, 1, 4, 1, 4, backend="numpy", dtype="float64")
    with pytest.raises(TypeError, match="casual"):
        rc.lsh_attention_vjp(qk, v, rotations, num_buckets=4, chunk_length=4, casual=True)


def test_dropout_rate_without_a_keep_mask_raises():
    qk, v = _normal(0, 1, 1, 8, 4), _normal(1, 1, 1, 8, 4)
    rotations = rc.random_rotations(0, 1, 4, 1, 4, backend="numpy", dtype="float64")
    for call in (lambda: rc.full_attention(qk, v, dropout_rate=0.5),
                 lambda: rc.local_attention(qk, qk, v, chunk_length=4, dropout_rate=0.5),
                 lambda: rc.lsh_attention(qk, v, rotations, num_buckets=4, chunk_length=4, dropout_rate=0.5)):
        with pytest.raises(ValueError, match="dropout_keep"):
            call()


def test_a_model_with_attention_dropout_still_evaluates_without_masks(tiny_config):
    import dataclasses

    config = dataclasses.replace(tiny_config, attention_dropout=0.1)
    params = rc.init_params(config, seed=0, backend="numpy")
    tokens = np.zeros((1, 16), dtype=np.int64)
    logits = rc.apply(params, tokens, config)
    assert np.isfinite(logits).all()

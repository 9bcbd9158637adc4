"""Every hand-written backward rule against central finite differences (float64).

For a random cotangent ``g`` and a random direction ``u`` over all inputs, each rule's
``<pullback(g), u>`` must match ``(f(x + eps u) - f(x - eps u)) . g / (2 eps)`` to a relative
error below 1e-6 with ``eps = 1e-6`` (see ``gradcheck.py``), over hypothesis-drawn shapes,
configurations, padding masks, dropout masks, causal on/off and several hashing rounds.
Gradient pytrees must have exactly the structure and shapes of what they differentiate.

Hashing has no gradient: the LSH rules hold the buckets fixed, so their finite differences
do too (``lsh_with_buckets`` with the buckets of the unperturbed input); where an input
upstream of the hashing is perturbed (attention block, whole model), an example whose
buckets change between ``x - eps u``, ``x`` and ``x + eps u`` is rejected with ``assume``.

Weights are scaled well above the default initialisation so the nonlinearities (softmax,
layer norm, activations) do real work. Smooth activations everywhere except the one relu test.

Run with ``-s`` to print the largest relative error seen per rule.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as xp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import reformer_core as rc
from reformer_core import full_attention_vjp, local_attention_vjp, lsh_attention_vjp
from reformer_core._attention import attend as attend_module
from reformer_core._attention.chunking import look_adjacent, look_adjacent_backward
from reformer_core._attention.lsh import lsh_with_buckets
from reformer_core._attention.rounds import combine_rounds, combine_rounds_backward
from reformer_core._model import layers

import gradcheck
from gradcheck import check_vjp, fast, keep_mask, padding_mask, seeds

@pytest.fixture(scope="module", autouse=True)
def _print_error_table():
    yield
    print("\n\nlargest relative error of <pullback(g), u> vs central differences, per rule:")
    print(gradcheck.report())


# ==================================================================== position-wise layers


@fast(200)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), d_in=st.integers(1, 5),
       d_out=st.integers(1, 5), bias=st.booleans(), seed=seeds)
def test_dense_vjp(lead, d_in, d_out, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, d_in))
    params = {"weight": 5 * rng.standard_normal((d_in, d_out))}
    if bias:
        params["bias"] = rng.standard_normal(d_out)
    out, pullback = layers.dense_vjp(xp, x, params)
    check_vjp("dense_vjp", lambda p, x: layers.dense(xp, x, p), pullback, (params, x), out, rng)


@fast(200)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), width=st.integers(2, 7),
       eps=st.sampled_from([1e-12, 1e-6, 1e-2]), seed=seeds)
def test_layer_norm_vjp(lead, width, eps, seed):
    """(Rows whose spread is tiny next to their mean are rejected: there ``x - mean(x)``
    cancels, the *forward* keeps ~ulp(|x|) / std(x) absolute precision, and central
    differences of it cannot reach 1e-6 relative; that is conditioning, not the rule.)"""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal()
    x = 3 * rng.standard_normal((*lead, width)) + offset
    assume(np.min(np.std(x, axis=-1)) > 0.05 * (1 + abs(offset)))
    params = {"scale": 1 + rng.standard_normal(width), "bias": rng.standard_normal(width)}
    out, pullback = layers.layer_norm_vjp(xp, x, params, eps)
    check_vjp("layer_norm_vjp", lambda p, x: layers.layer_norm(xp, x, p, eps), pullback, (params, x), out, rng)


@fast(150)
@given(name=st.sampled_from(["gelu_tanh", "silu"]), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       seed=seeds)
def test_activation_backward(name, shape, seed):
    """(|x| <= 3: further out gelu_tanh's ``1 + tanh(z)`` cancels, its *forward* keeps only
    ~1e-16 / (1 + tanh(z)) relative precision, and central differences of it lose ~5e-7 at
    x = -4 and ~1e-4 at x = -5; the tails are checked exactly by the complex-step test below.)"""
    rng = np.random.default_rng(seed)
    x = np.clip(1.5 * rng.standard_normal(shape), -3, 3)
    check_vjp(f"activation_backward[{name}]", lambda x: layers.activation(xp, name, x),
              lambda g: (layers.activation_backward(xp, name, x, g),), (x,), layers.activation(xp, name, x), rng)


@pytest.mark.parametrize("name", ["gelu_tanh", "silu"])
def test_activation_backward_complex_step(name):
    """The exact derivative over a wide range, tails included: the forward accepts complex
    input, and ``Im f(x + ih) / h`` with h = 1e-30 has no cancellation at all."""
    x = np.concatenate([np.linspace(-30, 30, 1201), np.random.default_rng(0).standard_normal(200)])
    exact = np.imag(layers.activation(xp, name, x + 1e-30j)) / 1e-30
    np.testing.assert_allclose(layers.activation_backward(xp, name, x, np.ones_like(x)), exact, rtol=1e-6,
                               atol=1e-14)
    g = np.random.default_rng(1).standard_normal(x.shape)
    np.testing.assert_allclose(layers.activation_backward(xp, name, x, g), g * exact, rtol=1e-6, atol=1e-14)


def ff_params(rng, d, d_ff, scale):
    return {
        "dense_in": {"weight": scale * rng.standard_normal((d, d_ff)) / math.sqrt(d), "bias": rng.standard_normal(d_ff)},
        "dense_out": {"weight": scale * rng.standard_normal((d_ff, d)) / math.sqrt(d_ff), "bias": rng.standard_normal(d)},
    }


@fast(150)
@given(name=st.sampled_from(["gelu_tanh", "silu"]), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       d=st.integers(1, 5), d_ff=st.integers(1, 6), scale=st.floats(1, 5), seed=seeds)
def test_feed_forward_vjp(name, lead, d, d_ff, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, d))
    params = ff_params(rng, d, d_ff, scale)
    out, pullback = layers.feed_forward_vjp(xp, x, params, activation_name=name)
    check_vjp(f"feed_forward_vjp[{name}]", lambda p, x: layers.feed_forward(xp, x, p, activation_name=name),
              pullback, (params, x), out, rng)


@fast(100)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), d=st.integers(1, 5), d_ff=st.integers(1, 6),
       seed=seeds)
def test_relu_rules(lead, d, d_ff, seed):
    """The one test with relu's kink: activation_backward and the feed-forward rule.

    Random float pre-activations never sit within eps of 0 in practice."""
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal((*lead, d))
    check_vjp("activation_backward[relu]", lambda x: layers.activation(xp, "relu", x),
              lambda g: (layers.activation_backward(xp, "relu", x, g),), (x,), layers.activation(xp, "relu", x), rng)
    params = ff_params(rng, d, d_ff, 3.0)
    out, pullback = layers.feed_forward_vjp(xp, x, params, activation_name="relu")
    check_vjp("feed_forward_vjp[relu]", lambda p, x: layers.feed_forward(xp, x, p, activation_name="relu"),
              pullback, (params, x), out, rng)


# ==================================================================== attention pieces


@fast(150)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(2, 6)),
       scale=st.floats(0.3, 3), seed=seeds)
def test_shared_qk_keys_backward(shape, scale, seed):
    """(head_dim >= 2: with one component the keys are sign(x) up to the 1e-6 epsilon, their
    derivative ~1e-6 / |x|^3, and central differences cannot resolve it to 1e-6 relative.
    Moderate scales: the keys are O(1) whatever |x|, their derivative ~1 / |x|, so at |x| ~ 10
    the differences' ~1e-10 rounding noise reaches ~1e-6 of a small directional derivative.)"""
    rng = np.random.default_rng(seed)
    qk = scale * rng.standard_normal(shape)
    check_vjp("shared_qk_keys_backward", lambda qk: attend_module.shared_qk_keys(xp, qk),
              lambda g: (attend_module.shared_qk_keys_backward(xp, qk, g),), (qk,),
              attend_module.shared_qk_keys(xp, qk), rng)


@fast(200)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 5),
                       st.integers(1, 4)),
       self_only=st.booleans(), seed=seeds)
def test_combine_rounds_backward(shape, self_only, seed):
    rng = np.random.default_rng(seed)
    outs = rng.standard_normal(shape)
    lses = 3 * rng.standard_normal(shape[:4])
    if self_only:  # log-sum-exps of tokens that could only attend to themselves
        lses = np.where(rng.random(lses.shape) < 0.3, attend_module.SELF_MASK_VALUE, lses)
    result = combine_rounds(xp, outs, lses)
    if shape[2] == 1:
        d_outs, d_lses = combine_rounds_backward(xp, outs, lses, np.ones(result.shape))
        assert d_lses is None
        check_vjp("combine_rounds_backward", lambda o: combine_rounds(xp, o, lses),
                  lambda g: (combine_rounds_backward(xp, outs, lses, g)[0],), (outs,), result, rng)
    else:
        check_vjp("combine_rounds_backward", lambda o, z: combine_rounds(xp, o, z),
                  lambda g: combine_rounds_backward(xp, outs, lses, g), (outs, lses), result, rng)


@fast(200)
@given(batch=st.integers(1, 2), nq=st.integers(1, 5), nk=st.integers(1, 6), d=st.integers(1, 4),
       dv=st.integers(1, 4), causal=st.booleans(), with_keep=st.booleans(), self_mask=st.booleans(),
       with_bias=st.booleans(), with_dropout=st.booleans(), with_lse=st.booleans(), seed=seeds)
def test_attend_backward(batch, nq, nk, d, dv, causal, with_keep, self_mask, with_bias, with_dropout, with_lse,
                         seed):
    """The masked softmax every kind shares, with and without a log-sum-exp cotangent."""
    rng = np.random.default_rng(seed)
    lead = (batch, 2)
    q, k, v = (2 * rng.standard_normal((*lead, nq, d)), rng.standard_normal((*lead, nk, d)),
               rng.standard_normal((*lead, nk, dv)))
    kwargs = dict(
        query_positions=rng.integers(0, 5, (*lead, nq)),
        key_positions=rng.integers(0, 5, (*lead, nk)),
        causal=causal,
        key_keep=rng.random((*lead, nk)) < 0.7 if with_keep else None,
        self_mask=self_mask,
        logit_bias=-np.log(rng.integers(1, 4, (*lead, nq, nk)).astype(float)) if with_bias else None,
        dropout_keep=keep_mask(rng, (*lead, nq, nk)) if with_dropout else None,
        dropout_rate=0.3 if with_dropout else 0.0,
    )
    out, lse, residuals = attend_module.attend(xp, q, k, v, return_residuals=True, **kwargs)
    drop = {"dropout_keep": kwargs["dropout_keep"], "dropout_rate": kwargs["dropout_rate"]}
    if with_lse:
        check_vjp("attend_backward", lambda q, k, v: attend_module.attend(xp, q, k, v, **kwargs),
                  lambda g: attend_module.attend_backward(xp, q, k, v, residuals, g[0], g[1], **drop),
                  (q, k, v), (out, lse), rng)
    else:
        check_vjp("attend_backward", lambda q, k, v: attend_module.attend(xp, q, k, v, **kwargs)[0],
                  lambda g: attend_module.attend_backward(xp, q, k, v, residuals, g, **drop), (q, k, v), out, rng)


@fast(150)
@given(chunks=st.integers(1, 4), chunk=st.integers(1, 3), before=st.integers(0, 2), after=st.integers(0, 2),
       seed=seeds)
def test_look_adjacent_backward(chunks, chunk, before, after, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 1, chunks, chunk, 3))
    check_vjp("look_adjacent_backward", lambda x: look_adjacent(xp, x, before, after),
              lambda g: (look_adjacent_backward(xp, g, before, after),), (x,), look_adjacent(xp, x, before, after), rng)


# ==================================================================== attention kinds


@st.composite
def chunked_problem(draw):
    """Shapes and chunking shared by the LSH and local problems."""
    batch, heads, head_dim = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(2, 4))
    chunk = draw(st.integers(1, 4))
    num_chunks = draw(st.integers(0, 4))  # 0: one chunk holds the whole (shorter) sequence
    length = draw(st.integers(1, chunk)) if num_chunks == 0 else chunk * num_chunks
    before, after = draw(st.integers(0, 2)), draw(st.integers(0, 1))
    return batch, heads, head_dim, chunk, length, before, after


@fast(300)
@given(problem=chunked_problem(), num_hashes=st.integers(1, 3),
       num_buckets=st.sampled_from([2, 4, 6, (2, 2), (2, 4)]), causal=st.booleans(),
       duplicate_correction=st.booleans(), with_dropout=st.booleans(), data=st.data(), seed=seeds)
def test_lsh_attention_vjp(problem, num_hashes, num_buckets, causal, duplicate_correction, with_dropout, data, seed):
    batch, heads, head_dim, chunk, length, before, after = problem
    rng = np.random.default_rng(seed)
    qk = 1.5 * rng.standard_normal((batch, heads, length, head_dim))
    v = rng.standard_normal((batch, heads, length, head_dim))
    rotations = rc.random_rotations(seed, heads, head_dim, num_hashes, num_buckets, dtype="float64")
    mask = padding_mask(data.draw, rng, batch, length)
    if length > chunk:
        window = chunk * (before + 1 + after)
        probs_shape = (batch, heads, num_hashes * length // chunk, chunk, window)
    else:
        probs_shape = (batch, heads, length, length)
    dropout = dict(dropout_rate=0.25, dropout_keep=keep_mask(rng, probs_shape, 0.25)) if with_dropout else {}
    kwargs = dict(num_buckets=num_buckets, chunk_length=chunk, num_chunks_before=before, num_chunks_after=after,
                  causal=causal, attention_mask=mask, duplicate_correction=duplicate_correction, **dropout)
    out, pullback = lsh_attention_vjp(qk, v, rotations, **kwargs)
    np.testing.assert_allclose(out, rc.lsh_attention(qk, v, rotations, **kwargs), rtol=1e-12, atol=1e-12)
    if length > chunk:
        buckets = rc.hash_vectors(qk, rotations, num_buckets, attention_mask=mask)
        options = dict(chunk_length=chunk, num_chunks_before=before, num_chunks_after=after, causal=causal,
                       duplicate_correction=duplicate_correction, **dropout)

        def f(qk, v):  # LSH attention with the unperturbed input's buckets
            return lsh_with_buckets(xp, qk, v, buckets, mask, with_pullback=False, **options)[0]
    else:

        def f(qk, v):  # a single chunk: no hashing involved
            return rc.lsh_attention(qk, v, rotations, **kwargs)

    check_vjp("lsh_attention_vjp", f, pullback, (qk, v), out, rng)


@fast(250)
@given(problem=chunked_problem(), causal=st.booleans(), with_dropout=st.booleans(), data=st.data(), seed=seeds)
def test_local_attention_vjp(problem, causal, with_dropout, data, seed):
    batch, heads, head_dim, chunk, length, before, after = problem
    rng = np.random.default_rng(seed)
    q, k, v = (1.5 * rng.standard_normal((batch, heads, length, head_dim)) for _ in range(3))
    mask = padding_mask(data.draw, rng, batch, length)
    if length > chunk:
        probs_shape = (batch, heads, length // chunk, chunk, chunk * (before + 1 + after))
    else:
        probs_shape = (batch, heads, length, length)
    dropout = dict(dropout_rate=0.25, dropout_keep=keep_mask(rng, probs_shape, 0.25)) if with_dropout else {}
    kwargs = dict(chunk_length=chunk, num_chunks_before=before, num_chunks_after=after, causal=causal,
                  attention_mask=mask, **dropout)
    out, pullback = local_attention_vjp(q, k, v, **kwargs)
    check_vjp("local_attention_vjp", lambda q, k, v: rc.local_attention(q, k, v, **kwargs), pullback, (q, k, v),
              out, rng)


@fast(200)
@given(batch=st.integers(1, 2), heads=st.integers(1, 2), length=st.integers(1, 7), head_dim=st.integers(2, 4),
       causal=st.booleans(), with_dropout=st.booleans(), data=st.data(), seed=seeds)
def test_full_attention_vjp(batch, heads, length, head_dim, causal, with_dropout, data, seed):
    """(head_dim >= 2 for shared-QK attention: see test_shared_qk_keys_backward.)"""
    rng = np.random.default_rng(seed)
    qk = 1.5 * rng.standard_normal((batch, heads, length, head_dim))
    v = rng.standard_normal((batch, heads, length, head_dim))
    mask = padding_mask(data.draw, rng, batch, length)
    dropout = (dict(dropout_rate=0.3, dropout_keep=keep_mask(rng, (batch, heads, length, length)))
               if with_dropout else {})
    kwargs = dict(causal=causal, attention_mask=mask, **dropout)
    out, pullback = full_attention_vjp(qk, v, **kwargs)
    check_vjp("full_attention_vjp", lambda qk, v: rc.full_attention(qk, v, **kwargs), pullback, (qk, v), out, rng)

"""Backward rules of the model level against central finite differences (float64): the
reversible blocks, embedding, output head and loss, the whole model, and the reversible
backward against storing activations. Conventions as in ``test_gradients.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from unittest import mock

import array_api_compat.numpy as xp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reformer_core as rc
from reformer_core import reversible_backward, stored_backward, tree_map, tree_map_with_path, tree_paths
from reformer_core._attention import lsh as lsh_module
from reformer_core._model import blocks, embedding, layers, training
from reformer_core._model import lm as model
from reformer_core._model.autodiff import rule_vjp

import gradcheck
from gradcheck import NUMPY, assert_same_structure, check_vjp, fast, keep_mask, padding_mask, seeds

@pytest.fixture(scope="module", autouse=True)
def _print_error_table():
    yield
    print("\n\nlargest relative error of <pullback(g), u> vs central differences, per rule:")
    print(gradcheck.report())


# ==================================================================== blocks


def base_config(**changes):
    fields = dict(vocab_size=20, d_model=8, num_heads=2, head_dim=4, d_ff=12, attention_layers=("lsh", "local", "full"),
                  lsh_chunk_length=4, local_chunk_length=4, axial_pos_shape=(4, 5), ff_chunk_length=3, num_hashes=2,
                  ff_activation="gelu_tanh")
    fields.update(changes)
    return rc.ReformerConfig(**fields)


def big_params(params, rng, scale):
    """Weights ``scale`` times the initialisation; layer-norm scales and all biases randomised."""

    def leaf(path, w):
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            return 1 + 0.3 * rng.standard_normal(w.shape)
        if name == "bias":
            return 0.3 * rng.standard_normal(w.shape)
        return scale * w

    return tree_map_with_path(leaf, params)


@st.composite
def block_cases(draw):
    kind = draw(st.sampled_from(["lsh", "local", "full"]))
    lsh_chunk, local_chunk = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
    chunk = {"lsh": lsh_chunk, "local": local_chunk, "full": 4}[kind]
    num_chunks = draw(st.integers(0, 4 if chunk == 4 else 6))
    length = draw(st.integers(1, chunk)) if num_chunks == 0 else chunk * num_chunks
    config = base_config(
        attention_layers=(kind,),
        causal=draw(st.booleans()),
        duplicate_correction=draw(st.booleans()),
        num_hashes=draw(st.integers(1, 3)),
        num_buckets=draw(st.sampled_from([None, 2, 4, (2, 2)])),
        lsh_chunk_length=lsh_chunk,
        local_chunk_length=local_chunk,
        lsh_num_chunks_before=draw(st.integers(0, 2)),
        lsh_num_chunks_after=draw(st.integers(0, 1)),
        local_num_chunks_before=draw(st.integers(0, 2)),
        local_num_chunks_after=draw(st.integers(0, 1)),
        attention_dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
    )
    batch, seed = draw(st.integers(1, 2)), draw(seeds)
    rng = np.random.default_rng(seed)
    mask = padding_mask(draw, rng, batch, length)
    scale = draw(st.floats(5, 20))
    return config, batch, length, mask, scale, seed


@fast(300)
@given(case=block_cases())
def test_attention_block_vjp(case):
    config, batch, length, mask, scale, seed = case
    kind = config.attention_layers[0]
    rng = np.random.default_rng(seed)
    params = big_params(rc.init_params(config, seed % 1000, dtype="float64")["layers"][0]["attention"], rng, scale)
    x = 2 * rng.standard_normal((batch, length, config.d_model)) + 0.5
    rotations = rc.sample_rotations(config, length, seed, like=x)[0]
    probs_keep = None
    if config.attention_dropout:
        probs_keep = keep_mask(rng, model.attention_logits_shape(kind, config, batch, length), config.attention_dropout)
    bound = dict(rotations=rotations, attention_mask=mask, probs_keep=probs_keep)
    out, pullback = blocks.attention_block_vjp(xp, params, x, kind, config, **bound)
    fixed = None
    if kind == "lsh" and length > config.lsh_chunk_length:

        def fixed(params, x):  # the buckets of the projected qk: they must not flip under x +- eps u
            h = layers.layer_norm(xp, x, params["norm"], config.layer_norm_eps)
            qk = blocks.split_heads(xp, xp.matmul(h, params["qk"]), config.num_heads)
            return rc.hash_vectors(qk, rotations, config.num_buckets_for(length), attention_mask=mask)

    check_vjp(f"attention_block_vjp[{kind}]", lambda p, x: blocks.attention_block(xp, p, x, kind, config, **bound),
              pullback, (params, x), out, rng, fixed=fixed)


@fast(150)
@given(batch=st.integers(1, 2), length=st.integers(1, 7), ff_chunk=st.sampled_from([None, 1, 2, 3, 5]),
       activation=st.sampled_from(["gelu_tanh", "silu"]), scale=st.floats(5, 20), seed=seeds)
def test_feed_forward_block_vjp(batch, length, ff_chunk, activation, scale, seed):
    config = base_config(ff_chunk_length=ff_chunk, ff_activation=activation)
    rng = np.random.default_rng(seed)
    params = big_params(rc.init_params(config, seed % 1000, dtype="float64")["layers"][0]["feed_forward"], rng, scale)
    x = 2 * rng.standard_normal((batch, length, config.d_model))
    out, pullback = blocks.feed_forward_block_vjp(xp, params, x, config)
    check_vjp(f"feed_forward_block_vjp[{activation}]", lambda p, x: blocks.feed_forward_block(xp, p, x, config),
              pullback, (params, x), out, rng)


# ==================================================================== embedding, head, loss


@pytest.mark.parametrize("rows_per_step", [None, 1, 3])
@fast(75)
@given(batch=st.integers(1, 3), length=st.integers(1, 7), vocab=st.integers(1, 9), width=st.integers(1, 4),
       seed=seeds)
def test_token_embedding_backward(rows_per_step, batch, length, vocab, width, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length))
    table = rng.standard_normal((vocab, width))
    grad = lambda g: (embedding.token_embedding_backward(xp, tokens, g, vocab, rows_per_step=rows_per_step),)
    check_vjp(f"token_embedding_backward[rows_per_step={rows_per_step}]",
              lambda t: embedding.token_embedding(xp, tokens, t), grad, (table,),
              embedding.token_embedding(xp, tokens, table), rng)
    # Also exactly the scatter-add it replaces.
    g = rng.standard_normal((batch, length, width))
    expected = np.zeros((vocab, width))
    np.add.at(expected, tokens.reshape(-1), g.reshape(-1, width))
    np.testing.assert_allclose(grad(g)[0], expected, rtol=1e-13, atol=1e-13)


@fast(150)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=3), full=st.booleans(), data=st.data(), seed=seeds)
def test_axial_positional_embedding_backward(shape, full, data, seed):
    rng = np.random.default_rng(seed)
    total = math.prod(shape)
    length = total if full else data.draw(st.integers(1, total))
    weights = [rng.standard_normal((size, data.draw(st.integers(1, 3)))) for size in shape]
    check_vjp(f"axial_positional_embedding_backward[{len(shape)} axes]",
              lambda w: embedding.axial_positional_embedding(xp, w, length),
              lambda g: (embedding.axial_positional_embedding_backward(xp, weights, g),), (weights,),
              embedding.axial_positional_embedding(xp, weights, length), rng)


@fast(125)
@given(batch=st.integers(1, 2), length=st.integers(1, 20), dropout=st.booleans(), scale=st.floats(5, 20),
       axial=st.sampled_from([(4, 5), (2, 2, 5)]), seed=seeds)
def test_embed_vjp(batch, length, dropout, scale, axial, seed):
    config = base_config(axial_pos_shape=axial, hidden_dropout=0.3 if dropout else 0.0)
    rng = np.random.default_rng(seed)
    params = big_params(rc.init_params(config, seed % 1000, dtype="float64")["embedding"], rng, scale)
    tokens = rng.integers(0, config.vocab_size, (batch, length))
    keep = keep_mask(rng, (batch, length, config.d_model)) if dropout else None
    out, pullback = model.embed_vjp(xp, params, tokens, config, keep)
    check_vjp("embed_vjp", lambda p: model.embed(xp, p, tokens, config, keep), lambda g: (pullback(g),), (params,),
              out, rng)


@fast(125)
@given(batch=st.integers(1, 2), length=st.integers(1, 6), dropout=st.booleans(), scale=st.floats(5, 20), seed=seeds)
def test_output_head_vjp(batch, length, dropout, scale, seed):
    config = base_config(hidden_dropout=0.3 if dropout else 0.0)
    rng = np.random.default_rng(seed)
    full = rc.init_params(config, seed % 1000, dtype="float64")
    params = big_params({"final_norm": full["final_norm"], "output": full["output"]}, rng, scale)
    y1, y2 = (2 * rng.standard_normal((batch, length, config.d_model)) for _ in range(2))
    keep = keep_mask(rng, (batch, length, 2 * config.d_model)) if dropout else None
    out, pullback = model.output_head_vjp(xp, params, y1, y2, config, keep)
    check_vjp("output_head_vjp", lambda p, y1, y2: model.output_head(xp, p, y1, y2, config, keep), pullback,
              (params, y1, y2), out, rng)


@fast(150)
@given(batch=st.integers(1, 3), length=st.integers(1, 5), vocab=st.integers(1, 7),
       weights=st.sampled_from(["none", "float", "bool"]), seed=seeds)
def test_cross_entropy_loss_vjp(batch, length, vocab, weights, seed):
    """(Logits are moderate, 1.5 sigma, with each row's largest shifted to 0. A token predicted
    with probability 1 - p has a loss ~p evaluated to ~1e-16 + ulp(max logit) absolute (the
    ``1 + p`` inside the log-sum-exp, the ``lse - logit`` difference) but a gradient of only
    ~p, so central differences resolve it to ~1e-10 / p relative: well-predicted tokens with
    p < 1e-4 are beyond a 1e-6 check. The gradient is shift-invariant.)"""
    rng = np.random.default_rng(seed)
    logits = 1.5 * rng.standard_normal((batch, length, vocab))
    logits = logits - np.max(logits, axis=-1, keepdims=True)
    targets = rng.integers(0, vocab, (batch, length))
    w = {"none": None, "float": rng.random((batch, length)) + 0.1,
         "bool": np.concatenate([np.ones((batch, 1), bool), rng.random((batch, length - 1)) < 0.5], axis=1)}[weights]
    loss, pullback = model.cross_entropy_loss_vjp(logits, targets, weights=w)
    check_vjp("cross_entropy_loss_vjp", lambda z: model.cross_entropy_loss(z, targets, weights=w),
              lambda g: (pullback(g),), (logits,), loss, rng)


# ==================================================================== the whole model


@contextmanager
def recorded_buckets():
    """Record every LSH bucket array the library computes inside the ``with`` statement."""
    seen = []
    real = lsh_module.compute_buckets

    def spy(*args, **kwargs):
        buckets = real(*args, **kwargs)
        seen.append(buckets)
        return buckets

    with mock.patch.object(lsh_module, "compute_buckets", spy):
        yield seen


@st.composite
def model_cases(draw):
    kinds = tuple(draw(st.lists(st.sampled_from(["lsh", "local", "full"]), min_size=1, max_size=3)))
    chunk = draw(st.sampled_from([2, 4]))
    length = draw(st.sampled_from([chunk, 2 * chunk, 3 * chunk, 4 * chunk, 1, 3] if chunk == 4
                                  else [chunk, 2 * chunk, 4 * chunk, 1]))
    hidden, attention = draw(st.sampled_from([0.0, 0.2])), draw(st.sampled_from([0.0, 0.2]))
    config = base_config(
        attention_layers=kinds,
        causal=draw(st.booleans()),
        duplicate_correction=draw(st.booleans()),
        num_hashes=draw(st.integers(1, 3)),
        lsh_chunk_length=chunk,
        local_chunk_length=chunk,
        lsh_num_chunks_after=draw(st.integers(0, 1)),
        ff_chunk_length=draw(st.sampled_from([None, 3])),
        ff_activation=draw(st.sampled_from(["gelu_tanh", "silu"])),
        hidden_dropout=hidden,
        attention_dropout=attention,
    )
    batch, seed = draw(st.integers(1, 2)), draw(seeds)
    rng = np.random.default_rng(seed)
    return dict(
        config=config,
        batch=batch,
        length=length,
        mask=padding_mask(draw, rng, batch, length),
        dropout_seed=draw(st.integers(0, 99)) if hidden or attention else draw(st.sampled_from([None, 5])),
        weights=draw(st.sampled_from([None, "float"])),
        scale=draw(st.floats(5, 20)),
        seed=seed,
    )


def model_inputs(case):
    config, batch, length, seed = case["config"], case["batch"], case["length"], case["seed"]
    rng = np.random.default_rng(seed)
    params = big_params(rc.init_params(config, seed % 1000, dtype="float64"), rng, case["scale"])
    tokens = rng.integers(0, config.vocab_size, (batch, length))
    targets = rng.integers(0, config.vocab_size, (batch, length))
    weights = rng.random((batch, length)) + 0.1 if case["weights"] else None
    return rng, params, tokens, targets, weights


@fast(150)
@given(case=model_cases())
def test_value_and_grad_matches_finite_differences(case):
    check_model_gradient(case)


def fixed_case(kinds, *, causal, length, mask_row, dropout, seed):
    config = base_config(attention_layers=kinds, causal=causal, duplicate_correction=True, num_hashes=3,
                         hidden_dropout=0.2 if dropout else 0.0, attention_dropout=0.2 if dropout else 0.0)
    mask = np.ones((2, length), dtype=bool)
    mask[1, mask_row:] = False
    return dict(config=config, batch=2, length=length, mask=mask, dropout_seed=7 if dropout else None,
                weights="float", scale=10.0, seed=seed)


@pytest.mark.parametrize("case", [
    fixed_case(("lsh", "local", "full"), causal=True, length=8, mask_row=5, dropout=True, seed=1),
    fixed_case(("lsh", "local", "full"), causal=False, length=8, mask_row=6, dropout=True, seed=2),
    fixed_case(("lsh", "lsh"), causal=True, length=16, mask_row=13, dropout=False, seed=3),
    fixed_case(("local", "full", "lsh"), causal=False, length=12, mask_row=12, dropout=True, seed=4),
], ids=["causal-dropout-mask", "noncausal-dropout-mask", "lsh-lsh-causal", "noncausal-no-padding"])
def test_value_and_grad_fixed_configs(case):
    """Every attention kind, dropout, padding, duplicate correction and 3 rounds, causal and not."""
    check_model_gradient(case)


def check_model_gradient(case):
    config = case["config"]
    rng, params, tokens, targets, weights = model_inputs(case)
    run = dict(rotations_seed=case["seed"] % 7, attention_mask=case["mask"], dropout_seed=case["dropout_seed"])
    loss, grads = training.value_and_grad(params, tokens, targets, config, weights=weights, **run)

    # exactly the params' structure: same paths in the same order, same shapes and dtype
    assert [p for p, _ in tree_paths(grads)] == [p for p, _ in tree_paths(params)]
    tree_map(lambda g, p: None, grads, params)  # raises where the containers differ
    assert_same_structure(grads, params)  # and every leaf: shape, float64

    def loss_of(p):
        return rc.cross_entropy_loss(rc.apply(p, tokens, config, **run), targets, weights=weights)

    def buckets_of(p):
        with recorded_buckets() as seen:
            loss_of(p)
        return seen

    check_vjp("value_and_grad", loss_of, lambda g: (tree_map(lambda leaf: g * leaf, grads),), (params,), loss, rng,
              fixed=buckets_of)


# ==================================================================== reversible backward


def mixed_stack(num_layers, **changes):
    kinds = ("lsh", "local", "full", "lsh", "full", "local")[:num_layers]
    fields = dict(attention_layers=kinds, causal=True, num_hashes=2, hidden_dropout=0.1, attention_dropout=0.1,
                  duplicate_correction=True)
    return base_config(**{**fields, **changes})


@pytest.mark.parametrize("num_layers", [4, 5, 6])
def test_reversible_and_stored_backward_agree(num_layers):
    config = mixed_stack(num_layers, causal=num_layers != 5)
    rng = np.random.default_rng(num_layers)
    params = big_params(rc.init_params(config, num_layers, dtype="float64"), rng, 10.0)
    batch, length = 2, 16
    tokens = rng.integers(0, config.vocab_size, (batch, length))
    targets = rng.integers(0, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), dtype=bool)
    mask[1, 11:] = False
    run = dict(rotations_seed=3, attention_mask=mask, dropout_seed=11, weights=mask.astype(float))
    loss_r, grads_r = training.value_and_grad(params, tokens, targets, config, reversible=True, **run)
    loss_s, grads_s = training.value_and_grad(params, tokens, targets, config, reversible=False, **run)
    assert abs(float(loss_r) - float(loss_s)) <= 1e-10
    assert_same_structure(grads_r, params)
    assert_same_structure(grads_s, params)
    for (path, a), (_, b) in zip(tree_paths(grads_r), tree_paths(grads_s)):
        assert np.max(np.abs(a - b), initial=0.0) <= 1e-10, (path, np.max(np.abs(a - b)))
    assert np.max(np.abs(grads_r["layers"][0]["attention"]["qk"])) > 1e-3  # the gradient reaches the bottom


def reversible_layers_for(config, params, x, seed, mask, masks):
    rotations = rc.sample_rotations(config, x.shape[1], seed, like=x)
    return blocks.reversible_layers(xp, params, config, rotations=rotations, attention_mask=mask, dropout_masks=masks)


@pytest.mark.parametrize("num_layers", [4, 6])
def test_reversible_backward_rebuilds_inputs(num_layers):
    config = mixed_stack(num_layers)
    rng = np.random.default_rng(100 + num_layers)
    params = big_params(rc.init_params(config, 1, dtype="float64"), rng, 10.0)
    batch, length = 2, 12
    tokens = rng.integers(0, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), dtype=bool)
    mask[0, 9:] = False
    masks = model.sample_dropout_masks(config, batch, length, 4, backend=NUMPY)
    x = model.embed(xp, params["embedding"], tokens, config, masks["embedding"])
    stack = reversible_layers_for(config, params, x, 2, mask, masks)
    y1, y2 = rc.reversible_forward(stack, x, x)
    assert np.linalg.norm(y1 - x) > 0.1 * np.linalg.norm(x)  # the stack does real work
    d_y1, d_y2 = rng.standard_normal(y1.shape), rng.standard_normal(y2.shape)
    (x1, x2), (d_x1, d_x2), grads = reversible_backward(stack, y1, y2, d_y1, d_y2, vjp=rule_vjp)
    assert np.max(np.abs(x1 - x)) <= 1e-10 and np.max(np.abs(x2 - x)) <= 1e-10
    (z1, z2), (e_x1, e_x2), stored = stored_backward(stack, x, x, lambda *_: (d_y1, d_y2), vjp=rule_vjp)
    assert np.max(np.abs(z1 - y1)) <= 1e-10 and np.max(np.abs(z2 - y2)) <= 1e-10
    assert np.max(np.abs(d_x1 - e_x1)) <= 1e-10 and np.max(np.abs(d_x2 - e_x2)) <= 1e-10
    assert_same_structure(grads, stored)
    for a, b in zip(gradcheck.leaves(grads), gradcheck.leaves(stored)):
        assert np.max(np.abs(a - b), initial=0.0) <= 1e-10


@fast(50)
@given(num_layers=st.integers(1, 4), seed=seeds)
def test_reversible_backward_matches_finite_differences(num_layers, seed):
    """The stack's pullback w.r.t. its layer params and two *different* inputs x1, x2."""
    config = mixed_stack(num_layers)
    rng = np.random.default_rng(seed)
    params = big_params(rc.init_params(config, seed % 1000, dtype="float64"), rng, 10.0)
    batch, length = 2, 8
    x1, x2 = (rng.standard_normal((batch, length, config.d_model)) for _ in range(2))
    mask = rng.random((batch, length)) < 0.8
    masks = model.sample_dropout_masks(config, batch, length, seed % 1000, backend=NUMPY)

    def run(layer_params, x1, x2):
        stack = reversible_layers_for(config, {**params, "layers": layer_params}, x1, 5, mask, masks)
        return rc.reversible_forward(stack, x1, x2)

    def buckets_of(*primals):
        with recorded_buckets() as seen:
            run(*primals)
        return seen

    y1, y2 = run(params["layers"], x1, x2)
    stack = reversible_layers_for(config, params, x1, 5, mask, masks)

    def pullback(g):
        _, (d_x1, d_x2), grads = reversible_backward(stack, y1, y2, g[0], g[1], vjp=rule_vjp)
        return [{"attention": d_f, "feed_forward": d_g} for d_f, d_g in grads], d_x1, d_x2

    check_vjp("reversible_backward", run, pullback, (params["layers"], x1, x2), (y1, y2), rng, fixed=buckets_of)

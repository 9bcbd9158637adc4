"""The core on array_api_strict (standard 2024.12) computes what it computes on NumPy.

Strict rejects anything outside the standard, so these tests prove the core uses only
the standard. Running on strict's non-default device also proves no array is created on,
or moved to, the wrong device.
"""

import numpy as np
import pytest

array_api_strict = pytest.importorskip("array_api_strict")

import reformer_core as rc  # noqa: E402
from reformer_core import use_backend  # noqa: E402
from reformer_core._arrays import device_of  # noqa: E402
from reformer_core._registry import framework_of  # noqa: E402

DEVICES = ["CPU_DEVICE", "device1"]


def to_strict(backend, *arrays):
    return [backend.from_numpy(a) for a in arrays]


def assert_on(backend, array):
    assert framework_of(array) == "strict"
    assert str(device_of(array)) == str(backend.device)


@pytest.fixture(params=DEVICES)
def strict(request):
    with use_backend("strict", device=request.param) as backend:
        yield backend


def inputs(seed=0, shape=(2, 3, 32, 8)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape)


@pytest.mark.parametrize("num_buckets", [4, (2, 4)])
def test_hash_vectors(strict, num_buckets):
    x, _, _ = inputs()
    mask = np.ones((2, 32), dtype=bool)
    mask[1, 20:] = False
    rotations = rc.random_rotations(3, 3, 8, 3, num_buckets, dtype="float64", backend=strict)
    expected = rc.hash_vectors(x, strict.to_numpy(rotations), num_buckets, attention_mask=mask)
    got = rc.hash_vectors(*to_strict(strict, x), rotations, num_buckets, attention_mask=strict.from_numpy(mask))
    assert_on(strict, got)
    np.testing.assert_array_equal(strict.to_numpy(got), expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("duplicate_correction", [False, True])
def test_lsh_attention(strict, causal, duplicate_correction):
    qk, v, _ = inputs(1)
    mask = np.ones((2, 32), dtype=bool)
    mask[0, 25:] = False
    rotations = rc.random_rotations(5, 3, 8, 2, (2, 4), dtype="float64", backend=strict)
    kwargs = dict(num_buckets=(2, 4), chunk_length=8, causal=causal, duplicate_correction=duplicate_correction)
    expected = rc.lsh_attention(qk, v, strict.to_numpy(rotations), attention_mask=mask, **kwargs)
    got = rc.lsh_attention(*to_strict(strict, qk, v), rotations, attention_mask=strict.from_numpy(mask), **kwargs)
    assert_on(strict, got)
    np.testing.assert_allclose(strict.to_numpy(got), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [8, 32])
def test_local_and_full_attention(strict, length):
    q, k, v = inputs(2, (2, 3, length, 8))
    mask = np.ones((2, length), dtype=bool)
    mask[1, -3:] = False
    got = rc.local_attention(*to_strict(strict, q, k, v), chunk_length=8, num_chunks_after=1, causal=False,
                             attention_mask=strict.from_numpy(mask))
    assert_on(strict, got)
    expected = rc.local_attention(q, k, v, chunk_length=8, num_chunks_after=1, attention_mask=mask)
    np.testing.assert_allclose(strict.to_numpy(got), expected, rtol=1e-12, atol=1e-12)
    got = rc.full_attention(*to_strict(strict, q, v), causal=True, attention_mask=strict.from_numpy(mask))
    assert_on(strict, got)
    expected = rc.full_attention(q, v, causal=True, attention_mask=mask)
    np.testing.assert_allclose(strict.to_numpy(got), expected, rtol=1e-12, atol=1e-12)


def test_pad_to_multiple(strict):
    tokens = np.arange(10).reshape(2, 5)
    padded, keep = rc.pad_to_multiple(strict.from_numpy(tokens), 4)
    assert_on(strict, padded)
    assert_on(strict, keep)
    np.testing.assert_array_equal(strict.to_numpy(padded), np.concatenate([tokens, np.zeros((2, 3), int)], 1))
    np.testing.assert_array_equal(strict.to_numpy(keep), np.arange(8)[None].repeat(2, 0) < 5)


def small_config(**changes):
    base = dict(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                attention_layers=("lsh", "local", "full", "lsh"), num_hashes=2, lsh_chunk_length=8,
                local_chunk_length=8, axial_pos_shape=(4, 8), ff_chunk_length=5,
                hidden_dropout=0.1, attention_dropout=0.2, duplicate_correction=True)
    base.update(changes)
    return rc.ReformerConfig(**base)


@pytest.mark.parametrize("dropout_seed", [None, 7])
def test_model_apply_and_loss(strict, dropout_seed):
    config = small_config()
    tokens = np.random.default_rng(3).integers(0, 40, (2, 32))
    mask = np.ones((2, 32), dtype=bool)
    mask[1, 28:] = False
    with use_backend("numpy"):
        params = rc.init_params(config, 11, dtype="float64")
        expected = rc.apply(params, tokens, config, rotations_seed=4, attention_mask=mask, dropout_seed=dropout_seed)
        expected_loss = rc.cross_entropy_loss(expected, tokens, weights=mask)
    strict_params = rc.init_params(config, 11, dtype="float64")
    logits = rc.apply(strict_params, strict.from_numpy(tokens), config, rotations_seed=4,
                      attention_mask=strict.from_numpy(mask), dropout_seed=dropout_seed)
    assert_on(strict, logits)
    np.testing.assert_allclose(strict.to_numpy(logits), expected, rtol=1e-10, atol=1e-12)
    loss = rc.cross_entropy_loss(logits, strict.from_numpy(tokens), weights=strict.from_numpy(mask))
    assert_on(strict, loss)
    np.testing.assert_allclose(float(strict.to_numpy(loss)), float(expected_loss), rtol=1e-12)


def test_reversible_inverse(strict):
    config = small_config(hidden_dropout=0.0, attention_dropout=0.0)
    from reformer_core import sample_rotations
    from reformer_core._model.blocks import reversible_layers

    x = strict.from_numpy(np.random.default_rng(0).standard_normal((2, 32, 16)))
    params = rc.init_params(config, 0, dtype="float64")
    blocks = reversible_layers(strict.xp, params, config, rotations=sample_rotations(config, 32, 0, like=x))
    y1, y2 = rc.reversible_forward(blocks, x, x)
    x1, x2 = rc.reversible_inverse(blocks, y1, y2)
    assert_on(strict, x1)
    np.testing.assert_allclose(strict.to_numpy(x1), strict.to_numpy(x), rtol=0, atol=1e-10)
    np.testing.assert_allclose(strict.to_numpy(x2), strict.to_numpy(x), rtol=0, atol=1e-10)


def test_training_step_keeps_every_array_on_the_device(strict):
    """A value_and_grad + Adam step on strict's device: gradients, moments and new parameters all
    stay there (a silent move to NumPy or to another device fails here, without a GPU)."""
    from reformer_core import Adam, tree_leaves, value_and_grad

    config = small_config(hidden_dropout=0.1, attention_dropout=0.1)
    params = rc.init_params(config, 0)
    tokens = strict.from_numpy(np.random.default_rng(0).integers(0, 40, (2, 32)))
    mask = strict.from_numpy(np.arange(32)[None].repeat(2, 0) < 30)
    loss, grads = value_and_grad(params, tokens, tokens, config, attention_mask=mask, dropout_seed=1)
    assert_on(strict, loss)
    optimizer = Adam(1e-3)
    new_params, state = optimizer.update(params, grads, optimizer.init(params))
    for leaf in tree_leaves(grads) + tree_leaves(new_params) + tree_leaves(state["m"]):
        assert_on(strict, leaf)
    with use_backend("numpy"):
        loss64, grads64 = value_and_grad(rc.init_params(config, 0), strict.to_numpy(tokens),
                                         strict.to_numpy(tokens), config, attention_mask=strict.to_numpy(mask),
                                         dropout_seed=1)
    np.testing.assert_allclose(float(strict.to_numpy(loss)), float(loss64), rtol=1e-5)

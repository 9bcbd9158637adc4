"""The model: layers, embeddings, parameters, apply and the loss."""

import math

import numpy as np
import pytest

import reformer_core as rc
from reformer_core._model.embedding import axial_positional_embedding
from reformer_core._model.layers import apply_in_chunks, layer_norm
from reformer_core._model.blocks import feed_forward_block


def config(**changes):
    base = dict(vocab_size=30, d_model=16, num_heads=2, head_dim=8, d_ff=24,
                attention_layers=("lsh", "local", "full"), num_hashes=2, lsh_chunk_length=8,
                local_chunk_length=8, axial_pos_shape=(4, 8))
    base.update(changes)
    return rc.ReformerConfig(**base)


def tokens(batch=2, length=32, vocab=30, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def test_apply_shapes_dtypes_and_finiteness():
    cfg = config()
    for dtype in ("float32", "float64"):
        logits = rc.apply(rc.init_params(cfg, 0, dtype=dtype), tokens(), cfg)
        assert logits.shape == (2, 32, 30)
        assert logits.dtype == np.dtype(dtype)
        assert np.isfinite(logits).all()


def test_param_shapes_follow_the_config():
    cfg = config()
    params = rc.init_params(cfg, 0)
    assert set(params["layers"][0]["attention"]) == {"norm", "qk", "v", "out"}
    assert set(params["layers"][1]["attention"]) == {"norm", "q", "k", "v", "out"}
    assert params["layers"][0]["attention"]["qk"].shape == (16, 16)
    assert params["layers"][2]["feed_forward"]["dense_in"]["weight"].shape == (16, 24)
    assert params["output"]["weight"].shape == (32, 30)
    assert [w.shape for w in params["embedding"]["axial"]] == [(4, 8), (8, 8)]
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["output"]["bias"], 0.0)
    assert abs(float(np.std(params["embedding"]["tokens"])) - cfg.initializer_range) < 0.005


def test_init_is_deterministic_and_per_leaf():
    a = rc.init_params(config(), 3)
    b = rc.init_params(config(attention_layers=("lsh", "local", "full", "lsh")), 3)
    np.testing.assert_array_equal(a["layers"][1]["attention"]["q"], b["layers"][1]["attention"]["q"])
    c = rc.init_params(config(), 4)
    assert not np.array_equal(a["embedding"]["tokens"], c["embedding"]["tokens"])


def test_axial_embedding_is_the_broadcast_concatenation():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((3, 2)), rng.standard_normal((5, 4))
    grid = np.concatenate([np.broadcast_to(w1[:, None, :], (3, 5, 2)), np.broadcast_to(w2[None, :, :], (3, 5, 4))], -1)
    for length in (1, 7, 15):
        np.testing.assert_array_equal(axial_positional_embedding(np, [w1, w2], length), grid.reshape(15, 6)[:length])
    with pytest.raises(ValueError, match="axial capacity"):
        axial_positional_embedding(np, [w1, w2], 16)


def test_layer_norm_matches_formula():
    x = np.random.default_rng(0).standard_normal((3, 5, 7))
    scale, bias = np.arange(7.0), np.ones(7)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_allclose(layer_norm(np, x, {"scale": scale, "bias": bias}, 1e-5), expected, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 8, 32, 100])
def test_chunked_feed_forward_equals_unchunked(chunk):
    cfg = config(ff_activation="gelu_tanh")
    params = rc.init_params(cfg, 1, dtype="float64")["layers"][0]["feed_forward"]
    x = np.random.default_rng(2).standard_normal((2, 32, 16))
    whole = feed_forward_block(np, params, x, cfg)
    chunked = feed_forward_block(np, params, x, cfg.replace(ff_chunk_length=chunk))
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-13)


def test_apply_in_chunks_calls_fn_on_bounded_pieces():
    seen = []

    def fn(piece):
        seen.append(piece.shape[1])
        return piece * 2

    x = np.arange(2 * 11 * 3.0).reshape(2, 11, 3)
    np.testing.assert_array_equal(apply_in_chunks(np, fn, x, 4), x * 2)
    assert seen == [4, 4, 3]


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_activations(activation):
    from reformer_core._model.layers import activation as act

    x = np.linspace(-3, 3, 13)
    expected = {
        "relu": np.maximum(x, 0),
        "gelu_tanh": 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "silu": x / (1 + np.exp(-x)),
    }[activation]
    np.testing.assert_allclose(act(np, activation, x), expected, rtol=1e-13)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7))
    targets = rng.integers(0, 7, (2, 5))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(rc.cross_entropy_loss(logits, targets), nll.mean(), rtol=1e-13)
    weights = np.zeros((2, 5))
    weights[:, 3:] = 1
    np.testing.assert_allclose(rc.cross_entropy_loss(logits, targets, weights=weights), nll[:, 3:].mean(), rtol=1e-13)


def test_lsh_and_full_layers_share_parameters():
    """A shared-QK model trained with full attention can be evaluated with LSH (paper, Table 2)."""
    full = config(attention_layers=("full", "full"))
    lsh = full.replace(attention_layers=("lsh", "lsh"))
    params = rc.init_params(full, 0, dtype="float64")
    short = tokens(length=8)  # one LSH chunk: LSH is exactly full attention
    np.testing.assert_allclose(rc.apply(params, short, lsh), rc.apply(params, short, full), rtol=1e-12)
    assert np.isfinite(rc.apply(params, tokens(), lsh)).all()


def test_randomness_is_explicit():
    cfg = config(hidden_dropout=0.2, attention_dropout=0.1)
    params = rc.init_params(cfg, 0, dtype="float64")
    t = tokens()
    np.testing.assert_array_equal(rc.apply(params, t, cfg), rc.apply(params, t, cfg))
    np.testing.assert_array_equal(rc.apply(params, t, cfg, dropout_seed=1), rc.apply(params, t, cfg, dropout_seed=1))
    assert not np.allclose(rc.apply(params, t, cfg, dropout_seed=1), rc.apply(params, t, cfg, dropout_seed=2))
    assert not np.allclose(rc.apply(params, t, cfg, rotations_seed=1), rc.apply(params, t, cfg, rotations_seed=2))
    explicit = rc.sample_rotations(cfg, 32, 1, like=params["output"]["weight"])
    np.testing.assert_array_equal(rc.apply(params, t, cfg, rotations=explicit), rc.apply(params, t, cfg, rotations_seed=1))


def test_padded_tokens_do_not_affect_real_positions():
    cfg = config(causal=False)
    params = rc.init_params(cfg, 0, dtype="float64")
    t = tokens()
    mask = np.ones((2, 32), dtype=bool)
    mask[0, 20:] = False
    mask[1, 30:] = False
    t2 = np.where(mask, t, (t + 7) % 30)
    a = rc.apply(params, t, cfg, attention_mask=mask)
    b = rc.apply(params, t2, cfg, attention_mask=mask)
    np.testing.assert_allclose(a[mask], b[mask], rtol=1e-12, atol=1e-12)
    assert not np.allclose(a[~mask], b[~mask])


def test_causal_model_with_single_chunk_ignores_future_tokens():
    cfg = config(lsh_chunk_length=32, local_chunk_length=32)
    params = rc.init_params(cfg, 0, dtype="float64")
    t = tokens()
    t2 = t.copy()
    t2[:, 20:] = (t2[:, 20:] + 1) % 30
    np.testing.assert_allclose(rc.apply(params, t, cfg)[:, :20], rc.apply(params, t2, cfg)[:, :20], rtol=1e-12)


def test_default_num_buckets_is_chosen_per_call():
    cfg = config(attention_layers=("lsh",))
    assert cfg.num_buckets is None
    rotations = rc.sample_rotations(cfg, 32, 0, like=np.zeros(1, dtype=np.float32))
    assert rotations[0].shape[-1] == rc.default_num_buckets(32, 8) // 2
    assert cfg.num_buckets is None

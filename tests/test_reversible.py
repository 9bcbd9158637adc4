"""The reversible stack: the inverse rebuilds the input from the output."""

import numpy as np
import pytest

import reformer_core as rc
from reformer_core import get_backend, sample_dropout_masks, sample_rotations, tree_map_with_path
from reformer_core._model.blocks import reversible_layers


def twelve_layer_config(**changes):
    base = dict(vocab_size=32, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                attention_layers=("lsh", "local", "full") * 4, num_hashes=2, lsh_chunk_length=16,
                local_chunk_length=16, axial_pos_shape=(8, 8), ff_chunk_length=24)
    base.update(changes)
    return rc.ReformerConfig(**base)


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float64", 1e-10)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_inverse_recovers_input_of_12_layers(dtype, tolerance, dropout):
    config = twelve_layer_config(hidden_dropout=dropout, attention_dropout=dropout)
    assert config.num_layers == 12
    params = rc.init_params(config, 0, dtype=dtype)
    # Larger weights than the default initialisation make the layers do real work.
    params = tree_map_with_path(lambda path, w: w if "norm" in path else w * 10, params)
    x = np.random.default_rng(0).standard_normal((2, 64, 32)).astype(dtype)
    masks = sample_dropout_masks(config, 2, 64, 3, backend=get_backend()) if dropout else None
    blocks = reversible_layers(np, params, config, rotations=sample_rotations(config, 64, 1, like=x),
                          dropout_masks=masks)
    y1, y2 = rc.reversible_forward(blocks, x, x)
    assert y1.dtype == np.dtype(dtype)
    assert relative_error(y1, x) > 0.1  # the stack changes its input substantially
    x1, x2 = rc.reversible_inverse(blocks, y1, y2)
    assert relative_error(x1, x) < tolerance
    assert relative_error(x2, x) < tolerance


def test_forward_matches_plain_residual_equations():
    """One layer by hand: Y1 = X1 + F(X2), Y2 = X2 + G(Y1)."""
    config = twelve_layer_config(attention_layers=("full",))
    params = rc.init_params(config, 2, dtype="float64")
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((2, 2, 64, 32))
    (layer,) = reversible_layers(np, params, config, rotations=[None])
    y1, y2 = rc.reversible_forward([layer], x1, x2)
    f_x2 = layer.f(layer.f_params, x2)
    np.testing.assert_allclose(y1, x1 + f_x2, rtol=1e-14)
    np.testing.assert_allclose(y2, x2 + layer.g(layer.g_params, x1 + f_x2), rtol=1e-14)

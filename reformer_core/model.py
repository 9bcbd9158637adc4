"""The Reformer language model, functional: ``init_params`` and ``apply``.

Parameters are a nested dict of arrays (a pytree), initialised in NumPy from a seed and
moved to the backend, so every backend starts from identical weights. Randomness
(rotations, dropout masks) is drawn on the host from explicit seeds, bound into each
layer's blocks, and so replayed exactly by the reversible inverse.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ._arrays import framework_of, namespace
from .config import ReformerConfig
from .embedding import axial_positional_embedding, token_embedding
from .full import full_attention
from .layers import apply_in_chunks, dense, dropout, feed_forward, layer_norm
from .local import local_attention
from .lsh import lsh_attention
from .hashing import random_rotations
from .reversible import reversible_forward
from .tree import tree_map_with_path, tree_paths

__all__ = [
    "init_params",
    "param_shapes",
    "apply",
    "sample_rotations",
    "sample_dropout_masks",
    "layer_blocks",
    "embed",
    "output_head",
    "cross_entropy_loss",
]


# ---------------------------------------------------------------- parameters


def param_shapes(config: ReformerConfig) -> dict:
    """The parameter pytree of ``config`` with shapes (tuples) as leaves."""
    d, inner = config.d_model, config.num_heads * config.head_dim
    norm = {"scale": (d,), "bias": (d,)}
    layers = []
    for kind in config.attention_layers:
        projections = ("q", "k", "v") if kind == "local" else ("qk", "v")
        attention = {"norm": dict(norm), **{p: (d, inner) for p in projections}, "out": (inner, d)}
        feed = {
            "norm": dict(norm),
            "dense_in": {"weight": (d, config.d_ff), "bias": (config.d_ff,)},
            "dense_out": {"weight": (config.d_ff, d), "bias": (d,)},
        }
        layers.append({"attention": attention, "feed_forward": feed})
    return {
        "embedding": {
            "tokens": (config.vocab_size, d),
            "axial": [(size, width) for size, width in zip(config.axial_pos_shape, config.axial_dims)],
        },
        "layers": layers,
        "final_norm": {"scale": (2 * d,), "bias": (2 * d,)},
        "output": {"weight": (2 * d, config.vocab_size), "bias": (config.vocab_size,)},
    }


def _init_leaf(path: str, shape: tuple, seed: int, std: float) -> np.ndarray:
    name = path.rsplit("/", 1)[-1]
    if name == "scale":
        return np.ones(shape)
    if name == "bias":
        return np.zeros(shape)
    # One stream per leaf, keyed by its path: adding a layer does not change the others.
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return rng.normal(0.0, std, size=shape)


def init_params(config: ReformerConfig, seed: int = 0, *, backend: Any = None, dtype: Any = "float32") -> dict:
    """Parameters for ``config``: drawn in float64 NumPy from ``seed``, cast, moved to ``backend``.

    Weights are normal with standard deviation ``config.initializer_range``, layer-norm
    scales one, biases zero. ``backend``: a backend object or name (default ``get_backend()``).
    """
    from .backend import resolve_backend

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    backend = resolve_backend(backend)
    return tree_map_with_path(
        lambda path, shape: backend.from_numpy(_init_leaf(path, shape, seed, config.initializer_range), dtype=dtype),
        param_shapes(config),
    )


def check_params(params: Any, config: ReformerConfig) -> None:
    """Raise when ``params`` does not have the structure and shapes ``config`` implies."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict from init_params, got {type(params).__name__}")

    def check(path, shape, leaf):
        if tuple(getattr(leaf, "shape", ())) != tuple(shape):
            raise ValueError(
                f"parameter {path} has shape {tuple(getattr(leaf, 'shape', ()))}, but the config needs {shape}; "
                f"were these params made for another config?"
            )

    try:
        tree_map_with_path(check, param_shapes(config), params)
    except ValueError as error:
        if "trees differ" in str(error):
            raise ValueError(f"params do not match the config's structure: {error}") from None
        raise
    leaves = [leaf for _, leaf in tree_paths(params)]
    frameworks = {framework_of(leaf) for leaf in leaves}
    if len(frameworks) != 1:
        raise TypeError(f"params mix arrays of several frameworks: {sorted(map(str, frameworks))}")
    dtypes = {str(leaf.dtype) for leaf in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"params mix dtypes {sorted(dtypes)}; cast them to one dtype")


# ---------------------------------------------------------------- randomness


def sample_rotations(config: ReformerConfig, length: int, seed: int, *, like: Any) -> list:
    """Rotations for every LSH layer (None for other layers), drawn from ``(seed, layer)``."""
    num_buckets = config.num_buckets_for(length)
    return [
        random_rotations((seed, i), config.num_heads, config.head_dim, config.num_hashes, num_buckets, like=like)
        if kind == "lsh"
        else None
        for i, kind in enumerate(config.attention_layers)
    ]


def attention_logits_shape(kind: str, config: ReformerConfig, batch: int, length: int) -> tuple:
    """Shape of a layer's attention probabilities (what attention dropout masks)."""
    heads = config.num_heads
    if kind == "full":
        return (batch, heads, length, length)
    if kind == "lsh":
        chunk, before, after, rounds = (config.lsh_chunk_length, config.lsh_num_chunks_before,
                                        config.lsh_num_chunks_after, config.num_hashes)
    else:
        chunk, before, after, rounds = (config.local_chunk_length, config.local_num_chunks_before,
                                        config.local_num_chunks_after, 1)
    if length <= chunk:
        return (batch, heads, length, length)
    return (batch, heads, rounds * length // chunk, chunk, chunk * (before + 1 + after))


def sample_dropout_masks(config: ReformerConfig, batch: int, length: int, seed: int, *, backend: Any) -> dict:
    """Bool keep-masks for every dropout site, drawn on the host from ``(seed, site)``."""

    def keep(rate: float, shape: tuple, *site: int):
        if rate == 0.0:
            return None
        host = np.random.default_rng([seed, *site]).random(shape) >= rate
        return backend.from_numpy(host)

    hidden = (batch, length, config.d_model)
    return {
        "embedding": keep(config.hidden_dropout, hidden, 0),
        "layers": [
            {
                "attention_probs": keep(config.attention_dropout,
                                        attention_logits_shape(kind, config, batch, length), 1, i, 0),
                "attention": keep(config.hidden_dropout, hidden, 1, i, 1),
                "feed_forward": keep(config.hidden_dropout, hidden, 1, i, 2),
            }
            for i, kind in enumerate(config.attention_layers)
        ],
        "output": keep(config.hidden_dropout, (batch, length, 2 * config.d_model), 2),
    }


# ---------------------------------------------------------------- blocks


def _split_heads(xp, x, heads):
    batch, length, inner = x.shape
    return xp.permute_dims(xp.reshape(x, (batch, length, heads, inner // heads)), (0, 2, 1, 3))


def _merge_heads(xp, x):
    batch, heads, length, head_dim = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (batch, length, heads * head_dim))


def attention_block(xp, params, x, kind, config, *, rotations=None, attention_mask=None, probs_keep=None):
    """``Attention(LayerNorm(x))`` of one layer: ``(batch, length, d_model)`` in and out."""
    h = layer_norm(xp, x, params["norm"], config.layer_norm_eps)

    def heads(name):
        return _split_heads(xp, xp.matmul(h, params[name]), config.num_heads)

    dropout_args = {"dropout_rate": config.attention_dropout, "dropout_keep": probs_keep}
    if kind == "lsh":
        out = lsh_attention(
            heads("qk"), heads("v"), rotations,
            num_buckets=config.num_buckets_for(x.shape[1]), chunk_length=config.lsh_chunk_length,
            num_chunks_before=config.lsh_num_chunks_before, num_chunks_after=config.lsh_num_chunks_after,
            causal=config.causal, attention_mask=attention_mask,
            duplicate_correction=config.duplicate_correction, **dropout_args,
        )
    elif kind == "full":
        out = full_attention(heads("qk"), heads("v"), causal=config.causal, attention_mask=attention_mask,
                             **dropout_args)
    else:
        out = local_attention(
            heads("q"), heads("k"), heads("v"),
            chunk_length=config.local_chunk_length, num_chunks_before=config.local_num_chunks_before,
            num_chunks_after=config.local_num_chunks_after, causal=config.causal,
            attention_mask=attention_mask, **dropout_args,
        )
    return xp.matmul(_merge_heads(xp, out), params["out"])


def feed_forward_block(xp, params, x, config):
    """``FeedForward(LayerNorm(x))``, ``config.ff_chunk_length`` positions at a time."""

    def position_wise(piece):
        return feed_forward(xp, layer_norm(xp, piece, params["norm"], config.layer_norm_eps), params,
                            activation_name=config.ff_activation)

    return apply_in_chunks(xp, position_wise, x, config.ff_chunk_length, axis=1)


def layer_blocks(xp, params, config, *, rotations, attention_mask=None, dropout_masks=None):
    """``[(F_i, G_i)]`` for every layer, with randomness and masks bound in."""
    blocks = []
    for i, kind in enumerate(config.attention_layers):
        layer = params["layers"][i]
        masks = dropout_masks["layers"][i] if dropout_masks else {}

        def f(x, layer=layer, kind=kind, rot=rotations[i], masks=masks):
            out = attention_block(xp, layer["attention"], x, kind, config, rotations=rot,
                                  attention_mask=attention_mask, probs_keep=masks.get("attention_probs"))
            return dropout(xp, out, masks.get("attention"), config.hidden_dropout)

        def g(x, layer=layer, masks=masks):
            out = feed_forward_block(xp, layer["feed_forward"], x, config)
            return dropout(xp, out, masks.get("feed_forward"), config.hidden_dropout)

        blocks.append((f, g))
    return blocks


def embed(xp, params, tokens, config, keep=None):
    """Token plus axial positional embedding, ``(batch, length, d_model)``."""
    x = token_embedding(xp, tokens, params["embedding"]["tokens"])
    x = x + axial_positional_embedding(xp, params["embedding"]["axial"], tokens.shape[1])
    return dropout(xp, x, keep, config.hidden_dropout)


def output_head(xp, params, y1, y2, config, keep=None):
    """``Dense(LayerNorm(concat([Y1, Y2])))`` -> logits ``(batch, length, vocab)``."""
    h = layer_norm(xp, xp.concat([y1, y2], axis=-1), params["final_norm"], config.layer_norm_eps)
    return dense(xp, dropout(xp, h, keep, config.hidden_dropout), params["output"])


# ---------------------------------------------------------------- model


def check_tokens(xp, tokens, config: ReformerConfig, check_values: bool) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
    if not xp.isdtype(tokens.dtype, "integral"):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}; cast them with xp.astype(tokens, xp.int64)")
    config.validate_length(tokens.shape[1])
    if check_values and tokens.shape[0] * tokens.shape[1]:
        low, high = int(xp.min(tokens)), int(xp.max(tokens))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, vocab_size={config.vocab_size}), got values in [{low}, {high}]"
            )


def apply(
    params: dict,
    tokens: Any,
    config: ReformerConfig,
    *,
    rotations_seed: int = 0,
    rotations: list | None = None,
    attention_mask: Any = None,
    dropout_seed: int | None = None,
    check_values: bool = True,
):
    """Logits of the Reformer language model.

    ``X = [x, x]`` for the embedded tokens x; each layer computes
    ``Y1 = X1 + Attention(LayerNorm(X2))`` and ``Y2 = X2 + FeedForward(LayerNorm(Y1))``;
    the output is ``Dense(LayerNorm(concat([Y1, Y2])))``.

    Args:
        params: from :func:`init_params` (any backend; tokens must be on the same one).
        tokens: int ``(batch, length)``.
        config: the model's :class:`ReformerConfig`.
        rotations_seed: seed of the LSH rotations (layer i uses ``(seed, i)``); change it
            per training step to resample them.
        rotations: explicit rotations per layer (None entries for non-LSH layers) instead.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.
        dropout_seed: None for inference (no dropout); an int draws dropout masks.
        check_values: check token ids against the vocabulary (one device sync).

    Returns:
        logits ``(batch, length, vocab_size)`` in the params' dtype.
    """
    from .backend import backend_for

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    check_params(params, config)
    table = params["embedding"]["tokens"]
    xp = namespace(tokens, table, attention_mask)
    check_tokens(xp, tokens, config, check_values)
    from ._arrays import check_same_device

    check_same_device({"tokens": tokens, "params": table, "attention_mask": attention_mask})
    batch, length = tokens.shape
    masks = None
    if dropout_seed is not None:
        masks = sample_dropout_masks(config, batch, length, dropout_seed, backend=backend_for(table))
    x = embed(xp, params, tokens, config, masks["embedding"] if masks else None)
    if rotations is None:
        rotations = sample_rotations(config, length, rotations_seed, like=x)
    elif len(rotations) != config.num_layers:
        raise ValueError(f"rotations must have one entry per layer ({config.num_layers}), got {len(rotations)}")
    blocks = layer_blocks(xp, params, config, rotations=rotations, attention_mask=attention_mask,
                          dropout_masks=masks)
    y1, y2 = reversible_forward(blocks, x, x)
    return output_head(xp, params, y1, y2, config, masks["output"] if masks else None)


def cross_entropy_loss(logits: Any, targets: Any, *, weights: Any = None):
    """Mean token cross-entropy, ``-sum(w * log softmax(logits)[target]) / sum(w)``.

    Args:
        logits: ``(batch, length, vocab)``; computed in at least float32.
        targets: int ``(batch, length)``.
        weights: optional ``(batch, length)`` float or bool, e.g. 1 on the positions to score.
    """
    from ._arrays import logsumexp

    xp = namespace(logits, targets, weights)
    if logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits must be (batch, length, vocab) and targets (batch, length); got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if not xp.isdtype(targets.dtype, "integral"):
        raise TypeError(f"targets must be integers, got {targets.dtype}")
    wide = xp.result_type(logits.dtype, xp.float32)
    logits = xp.astype(logits, wide)
    picked = xp.take_along_axis(logits, xp.astype(targets, xp.int64)[..., None], axis=-1)[..., 0]
    nll = logsumexp(xp, logits, axis=-1) - picked
    if weights is None:
        return xp.mean(nll)
    if tuple(weights.shape) != tuple(targets.shape):
        raise ValueError(f"weights must have the targets' shape {tuple(targets.shape)}, got {tuple(weights.shape)}")
    weights = xp.astype(weights, wide)
    return xp.sum(nll * weights) / xp.sum(weights)

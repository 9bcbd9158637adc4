"""The Reformer language model, functional: ``init_params`` and ``apply``.

Parameters are a nested dict of arrays (a pytree), initialised in NumPy from a seed and
moved to the backend, so every backend starts from identical weights. Randomness
(rotations, dropout masks) is drawn on the host from explicit seeds, bound into each
layer's blocks, and so replayed exactly by the reversible inverse.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import numpy as np

from .._arrays import check_same_device, device_of, framework_of, logsumexp, namespace
from .blocks import reversible_layers
from .._config import ReformerConfig
from .embedding import (
    axial_positional_embedding,
    axial_positional_embedding_backward,
    token_embedding,
    token_embedding_backward,
)
from .._attention.hashing import random_rotations
from .layers import dense, dense_vjp, dropout, layer_norm, layer_norm_vjp
from .reversible import reversible_forward
from .._tree import is_shape, tree_leaves, tree_map_with_path

__all__ = [
    "init_params",
    "param_shapes",
    "check_params",
    "parameter_dtype",
    "apply",
    "sample_rotations",
    "sample_dropout_masks",
    "resolve_rotations",
    "embed",
    "embed_vjp",
    "output_head",
    "output_head_vjp",
    "cross_entropy_loss",
    "cross_entropy_loss_vjp",
    "check_targets",
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


FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32``, ``np.dtype("float32")``, ``jnp.float32``, ..."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        try:
            name = np.dtype(dtype).name  # numpy scalar types and jax's dtype classes
        except TypeError:
            name = str(dtype)
    return name.rsplit(".", 1)[-1]


def parameter_dtype(backend: Any, dtype: Any):
    """``backend``'s dtype for ``dtype`` (a name or a dtype object), which must be floating.

    Parameters are only ever float16, bfloat16, float32 or float64: an integer or bool dtype
    would cast the weights to zeros (TypeError here instead); unknown names raise ValueError.
    """
    if isinstance(dtype, str) and dtype not in FLOAT_DTYPE_NAMES:
        try:
            np.dtype(dtype)
            known = True
        except TypeError:
            known = False
        raise (TypeError if known else ValueError)(
            f"dtype must be a floating dtype, one of {', '.join(FLOAT_DTYPE_NAMES)}, got "
            f"{'' if known else 'the unknown name '}{dtype!r}"
            + ("; parameters in an integer or bool dtype would be rounded to zeros" if known else "")
        )
    resolved = backend.dtype(dtype)
    name = _dtype_name(resolved)
    if name not in FLOAT_DTYPE_NAMES:
        raise TypeError(
            f"dtype must be a floating dtype, one of {', '.join(FLOAT_DTYPE_NAMES)}, got {dtype!r}; "
            f"parameters in an integer, bool or other dtype would be rounded or zeroed"
        )
    if not isinstance(dtype, str):
        expected = backend.dtype(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # array_api_strict warns on comparisons with NumPy dtypes
            try:
                same = bool(resolved == expected)
            except (TypeError, ValueError, AttributeError):
                same = False
            try:  # NumPy's dtype objects name JAX's and CuPy's dtypes too
                same = same or np.dtype(resolved) == np.dtype(expected)
            except TypeError:
                pass
        if not same:
            raise TypeError(f"dtype {dtype!r} is not a dtype of backend {backend.name!r}; pass its name {name!r}")
    return resolved


def init_params(config: ReformerConfig, seed: int = 0, *, backend: Any = None, dtype: Any = "float32") -> dict:
    """Parameters for ``config``: drawn in float64 NumPy from ``seed``, cast, moved to ``backend``.

    Weights are normal with standard deviation ``config.initializer_range``, layer-norm
    scales one, biases zero. ``backend``: a backend object or name (default ``get_backend()``).
    ``dtype``: float16, bfloat16, float32 (default) or float64, as a name or the backend's
    dtype object; anything else (an integer or bool dtype) raises TypeError.
    """
    from .._registry import resolve_backend

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    backend = resolve_backend(backend)
    dtype = parameter_dtype(backend, dtype)
    return tree_map_with_path(
        lambda path, shape: backend.from_numpy(_init_leaf(path, shape, seed, config.initializer_range), dtype=dtype),
        param_shapes(config), is_leaf=is_shape,
    )


def check_params(params: Any, config: ReformerConfig, *, shapes: dict | None = None) -> None:
    """Raise when ``params`` does not have the structure and shapes ``config`` implies.

    ``shapes``: the expected shape tree, default :func:`param_shapes` ``(config)`` (a backend
    with another layout of the layers, like JAX's scanned one, passes its own).
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict from init_params, got {type(params).__name__}")

    def check(path, shape, leaf):
        if tuple(getattr(leaf, "shape", ())) != tuple(shape):
            raise ValueError(
                f"parameter {path} has shape {tuple(getattr(leaf, 'shape', ()))}, but the config needs {shape}; "
                f"were these params made for another config?"
            )

    try:
        tree_map_with_path(check, param_shapes(config) if shapes is None else shapes, params, is_leaf=is_shape)
    except ValueError as error:
        if "trees differ" in str(error):
            raise ValueError(f"params do not match the config's structure: {error}") from None
        raise
    leaves = tree_leaves(params)
    frameworks = {framework_of(leaf) for leaf in leaves}
    if len(frameworks) != 1:
        raise TypeError(f"params mix arrays of several frameworks: {sorted(map(str, frameworks))}")
    dtypes = {str(leaf.dtype) for leaf in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"params mix dtypes {sorted(dtypes)}; cast them to one dtype")
    (dtype,) = dtypes
    if _dtype_name(leaves[0].dtype) not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"params have dtype {dtype}; parameters must be floating "
                        f"({', '.join(FLOAT_DTYPE_NAMES)}): cast them, or make them with init_params(..., dtype=...)")


# ---------------------------------------------------------------- randomness


def sample_rotations(config: ReformerConfig, length: int, seed: int, *, like: Any) -> list:
    """Rotations for every LSH layer (None for other layers), drawn from ``(seed, layer)``.

    With ``config.hash_seed`` set, ``seed`` is ignored: every LSH layer gets the rotations HF
    transformers draws for that ``hash_seed`` (needs torch; see ``docs/hf.md``).
    """
    if config.hash_seed is not None:
        from .hash_seed import hash_seed_rotations

        return hash_seed_rotations(config, length, like=like)
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


# ---------------------------------------------------------------- embedding and head


def embed(xp, params, tokens, config, keep=None):
    """Token plus axial positional embedding, ``(batch, length, d_model)``.

    ``params`` is the ``"embedding"`` entry of the model's parameters.
    """
    x = token_embedding(xp, tokens, params["tokens"])
    x = x + axial_positional_embedding(xp, params["axial"], tokens.shape[1])
    return dropout(xp, x, keep, config.hidden_dropout)


def embed_vjp(xp, params, tokens, config, keep=None):
    """``(embed(...), pullback)``; ``pullback(d_x) -> d_params`` (tokens have no gradient)."""

    def pullback(d_x):
        d_x = dropout(xp, d_x, keep, config.hidden_dropout)
        d_positions = xp.sum(d_x, axis=0)
        return {
            "tokens": token_embedding_backward(xp, tokens, d_x, params["tokens"].shape[0]),
            "axial": axial_positional_embedding_backward(xp, params["axial"], d_positions),
        }

    return embed(xp, params, tokens, config, keep), pullback


def output_head(xp, params, y1, y2, config, keep=None):
    """``Dense(LayerNorm(concat([Y1, Y2])))`` -> logits ``(batch, length, vocab)``.

    ``params`` holds the model's ``"final_norm"`` and ``"output"`` entries.
    """
    h = layer_norm(xp, xp.concat([y1, y2], axis=-1), params["final_norm"], config.layer_norm_eps)
    return dense(xp, dropout(xp, h, keep, config.hidden_dropout), params["output"])


def output_head_vjp(xp, params, y1, y2, config, keep=None):
    """``(output_head(...), pullback)``; ``pullback(d_logits) -> (d_params, d_y1, d_y2)``."""
    h, norm_pullback = layer_norm_vjp(xp, xp.concat([y1, y2], axis=-1), params["final_norm"], config.layer_norm_eps)
    logits, dense_pullback = dense_vjp(xp, dropout(xp, h, keep, config.hidden_dropout), params["output"])

    def pullback(d_logits):
        d_output, d_h = dense_pullback(d_logits)
        d_norm, d_cat = norm_pullback(dropout(xp, d_h, keep, config.hidden_dropout))
        width = y1.shape[-1]
        return {"final_norm": d_norm, "output": d_output}, d_cat[..., :width], d_cat[..., width:]

    return logits, pullback


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
    from .._registry import backend_for

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    check_params(params, config)
    table = params["embedding"]["tokens"]
    xp = namespace(tokens, table, attention_mask)
    check_tokens(xp, tokens, config, check_values)
    check_same_device({"tokens": tokens, "params": table, "attention_mask": attention_mask})
    batch, length = tokens.shape
    masks = None
    if dropout_seed is not None:
        masks = sample_dropout_masks(config, batch, length, dropout_seed, backend=backend_for(table))
    x = embed(xp, params["embedding"], tokens, config, masks["embedding"] if masks else None)
    rotations = resolve_rotations(config, length, rotations_seed, rotations, like=x)
    layers = reversible_layers(xp, params, config, rotations=rotations, attention_mask=attention_mask,
                               dropout_masks=masks)
    y1, y2 = reversible_forward(layers, x, x)
    return output_head(xp, params, y1, y2, config, masks["output"] if masks else None)


def resolve_rotations(config, length, rotations_seed, rotations, *, like):
    """Explicit rotations (checked: one entry per layer) or those drawn from the seed."""
    if rotations is None:
        return sample_rotations(config, length, rotations_seed, like=like)
    if not isinstance(rotations, (list, tuple)) or len(rotations) != config.num_layers:
        count = len(rotations) if hasattr(rotations, "__len__") else type(rotations).__name__
        raise ValueError(f"rotations must have one entry per layer ({config.num_layers}), got {count}; "
                         f"draw them with reformer_core.sample_rotations(config, length, seed, like=...)")
    return rotations


def cross_entropy_loss(logits: Any, targets: Any, *, weights: Any = None, ignore_index: int | None = None,
                       check_values: bool = True):
    """Mean token cross-entropy, ``-sum(w * log softmax(logits)[target]) / sum(w)``.

    Args:
        logits: ``(batch, length, vocab)``; computed in at least float32.
        targets: int ``(batch, length)``, each in ``[0, vocab)``, or ``ignore_index``.
        weights: optional ``(batch, length)`` float or bool, e.g. 1 on the positions to score.
        ignore_index: optional target value (e.g. -100, as in torch) whose positions get
            weight 0. Without it, no target value is special.
        check_values: check the targets' range (one device sync); see below.

    Targets are never wrapped to a real class: a target outside ``[0, vocab)`` that is not
    ``ignore_index`` raises ValueError naming the value and the range. That check needs
    concrete values: on traced arrays (inside ``jax.jit``), or with ``check_values=False``,
    it cannot raise, and such a position's loss is NaN instead (so the loss is NaN, never a
    silently wrong number); ``ignore_index`` positions still get weight 0.

    When the weights sum to zero (all zero, or every position ignored) the loss is 0 and
    its gradient is zero everywhere (not NaN): there is nothing to score.

    Returns:
        a 0-d array of at least float32.
    """
    return cross_entropy_loss_vjp(logits, targets, weights=weights, ignore_index=ignore_index,
                                  check_values=check_values, with_pullback=False)[0]


def _concrete_range(xp, array) -> tuple[int, int] | None:
    """``(min, max)`` of an integer array, or None when its values are traced (jax.jit)."""
    try:
        return int(xp.min(array)), int(xp.max(array))
    except TypeError as error:  # jax's ConcretizationTypeError is a TypeError: a tracer has no value
        if type(error).__module__.split(".", 1)[0] == "jax":
            return None
        raise


def check_targets(xp, targets, vocab_size: int, ignore_index: int | None) -> None:
    """ValueError when a concrete target lies outside ``[0, vocab_size)`` and is not ``ignore_index``."""
    if not targets.shape[0] * targets.shape[1]:
        return
    if ignore_index is not None:
        targets = xp.where(targets == ignore_index, xp.zeros_like(targets), targets)
    found = _concrete_range(xp, targets)
    if found is None:
        return
    low, high = found
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        hint = (f"targets equal to ignore_index={ignore_index} are skipped, other values must be valid classes"
                if ignore_index is not None else
                f"to skip positions, pass ignore_index={bad} (they get weight 0) or give them weight 0 and a "
                f"valid target")
        raise ValueError(
            f"targets must lie in [0, vocab_size={vocab_size}), got {bad} (values in [{low}, {high}]); {hint}"
        )


def cross_entropy_loss_vjp(logits: Any, targets: Any, *, weights: Any = None, ignore_index: int | None = None,
                           check_values: bool = True, with_pullback: bool = True):
    """``(loss, pullback)``; ``pullback(d_loss) -> d_logits`` (in the logits' dtype).

    ``d_logits = d_loss * w * (softmax(logits) - onehot(target)) / sum(w)`` (zero when
    ``sum(w) == 0``). Targets and ``ignore_index`` as for :func:`cross_entropy_loss`.
    """
    xp = namespace(logits, targets, weights)
    if logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits must be (batch, length, vocab) and targets (batch, length); got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if not xp.isdtype(targets.dtype, "integral"):
        raise TypeError(f"targets must be integers, got {targets.dtype}")
    if weights is not None and tuple(weights.shape) != tuple(targets.shape):
        raise ValueError(f"weights must have the targets' shape {tuple(targets.shape)}, got {tuple(weights.shape)}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int (e.g. -100) or None, got {ignore_index!r}")
    vocab_size = logits.shape[-1]
    if check_values:
        check_targets(xp, targets, vocab_size, ignore_index)
    wide = xp.result_type(logits.dtype, xp.float32)
    device = device_of(logits)
    wide_logits = xp.astype(logits, wide)
    targets = xp.astype(targets, xp.int64)
    shape = tuple(targets.shape)
    ignored = (targets == ignore_index) if ignore_index is not None else None
    valid = (targets >= 0) & (targets < vocab_size)
    if ignored is not None:
        valid = valid | ignored
    # Out-of-range targets reach here only unchecked (traced): their loss is NaN, never a
    # wrapped-around class; ignored ones gather class 0 and get weight 0.
    safe_targets = xp.where((targets >= 0) & (targets < vocab_size), targets, xp.zeros_like(targets))
    lse = logsumexp(xp, wide_logits, axis=-1)
    nll = lse - xp.take_along_axis(wide_logits, safe_targets[..., None], axis=-1)[..., 0]
    nll = xp.where(valid, nll, xp.full(shape, float("nan"), dtype=wide, device=device))
    if weights is None:
        w = xp.ones(shape, dtype=wide, device=device)
    else:
        w = xp.astype(weights, wide)
    if ignored is not None:
        w = xp.where(ignored, xp.zeros_like(w), w)
    if weights is None and ignored is None:
        w = w / float(shape[0] * shape[1] or 1)
    else:
        total = xp.sum(w)
        # Zero total weight: nothing to score, so loss 0 and zero gradients rather than 0/0 = NaN.
        w = w / xp.where(total == 0, xp.ones_like(total), total)
    loss = xp.sum(nll * w)
    if not with_pullback:
        return loss, None

    def pullback(d_loss):
        vocab = xp.arange(vocab_size, dtype=xp.int64, device=device)
        one_hot = xp.astype(safe_targets[..., None] == vocab, wide)
        probs = xp.exp(wide_logits - lse[..., None])
        return xp.astype((probs - one_hot) * (w * d_loss)[..., None], logits.dtype)

    return loss, pullback

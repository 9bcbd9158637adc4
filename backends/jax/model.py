"""The Reformer as pure JAX functions: a ``jax.custom_vjp`` reversible stack, and a model,
loss and gradient that take every random input as an argument.

Everything here works under ``jax.jit`` (``config`` static), ``jax.grad``, ``jax.vmap`` and
sharding; parameters are the core's pytree (nested dicts and lists of arrays), so optax and
``jax.tree`` work on them directly. Randomness is never drawn inside a traced function: the
rotations (and dropout masks) of a step are drawn on the host from the step number by
:func:`step_randomness` (NumPy, so every backend hashes identically) or from a
``jax.random`` key by :func:`rotations_from_key`, and passed in. A jitted step called with
another step number therefore uses other rotations; nothing is frozen at trace time.

Usage::

    from reformer_core.backends.jax import model as jax_model

    step_fn = jax.jit(jax_model.loss_and_grad, static_argnames="config")
    for step in range(steps):
        randomness = jax_model.step_randomness(config, step, batch=B, length=L, like=params)
        loss, grads = step_fn(params, tokens, targets, config, weights=weights, **randomness)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from reformer_core import ReformerConfig, param_shapes, reversible_forward, sample_dropout_masks, sample_rotations
from reformer_core._model.blocks import reversible_layer
from reformer_core._model.lm import check_params, check_tokens, cross_entropy_loss, embed, output_head, resolve_rotations
from reformer_core._model.reversible import reversible_backward_step

__all__ = [
    "reversible_stack",
    "layer_period",
    "stack_layers",
    "unstack_layers",
    "scanned_shapes",
    "apply",
    "loss",
    "loss_and_grad",
    "step_randomness",
    "rotations_from_key",
    "data_parallel_shardings",
]


# ---------------------------------------------------------------- the reversible stack
#
# The stack runs as a ``lax.scan`` over groups of layers (one group = one period of
# ``config.attention_layers``: the whole stack when it has no shorter period). Inside a loop
# XLA allocates one group's temporaries and reuses them every iteration, whatever the depth;
# an unrolled Python loop leaves the schedule to XLA, which on the CPU hoists per-layer
# buffers (broadcasts of each layer's parameters, zero buffers of gradient scatters) to the
# start of the backward and keeps them alive, so memory grew with depth. A scan also compiles
# in a time independent of the depth.


def layer_period(config: ReformerConfig) -> int:
    """The smallest ``p`` with ``attention_layers`` a repetition of its first ``p`` kinds."""
    kinds = config.attention_layers
    n = len(kinds)
    return next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))


def _stacked(trees: list):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stack_layers(params: dict, config: ReformerConfig) -> dict:
    """``params`` with the layers in the scanned layout: ``{"scanned": [group_0, ...]}``.

    ``group_j`` holds layers ``j, j + p, j + 2p, ...`` (``p`` = :func:`layer_period`), each
    leaf with a new leading axis of length ``num_layers // p``. The jitted step then reads the
    layers in place instead of stacking a copy of them (and of their gradients) every step;
    gradients come out in the same layout, so optax updates it directly. Use
    :func:`unstack_layers` to go back (checkpoints, other backends).
    """
    _check_config(config)
    check_params(params, config)
    period = layer_period(config)
    layers = params["layers"]
    return {**params, "layers": {"scanned": [_stacked(layers[j::period]) for j in range(period)]}}


def unstack_layers(params: dict, config: ReformerConfig) -> dict:
    """Inverse of :func:`stack_layers`: ``params["layers"]`` as the core's list of layers."""
    _check_config(config)
    check_params(params, config, shapes=scanned_shapes(config))
    return {**params, "layers": _unstacked(params["layers"]["scanned"], config.num_layers)}


def _unstacked(groups: list, num_layers: int) -> list:
    """Layer ``i`` is entry ``i // p`` of group ``i % p`` (``p = len(groups)``)."""
    period = len(groups)
    return [jax.tree.map(lambda leaf, r=i // period: leaf[r], groups[i % period]) for i in range(num_layers)]


def scanned_shapes(config: ReformerConfig) -> dict:
    """:func:`reformer_core.param_shapes` of the scanned layout of :func:`stack_layers`."""
    shapes = param_shapes(config)
    period = layer_period(config)
    repeats = config.num_layers // period
    groups = [jax.tree.map(lambda shape: (repeats, *shape), shapes["layers"][j], is_leaf=lambda x: isinstance(x, tuple))
              for j in range(period)]
    return {**shapes, "layers": {"scanned": groups}}


def _is_scanned(layers: Any) -> bool:
    return isinstance(layers, dict)


def _check_model_params(params: Any, config: ReformerConfig) -> None:
    scanned = isinstance(params, dict) and _is_scanned(params.get("layers"))
    check_params(params, config, shapes=scanned_shapes(config) if scanned else None)


def _group_inputs(config, layer_params, rotations, layer_dropout):
    """Per position in the period: stacked parameters, rotations and dropout masks."""
    period = layer_period(config)
    if _is_scanned(layer_params):
        params = list(layer_params["scanned"])
    else:
        params = [_stacked(layer_params[j::period]) for j in range(period)]
    rots = [None if rotations[j] is None else _stacked(rotations[j::period]) for j in range(period)]
    drops = [None if not layer_dropout else _stacked(layer_dropout[j::period]) for j in range(period)]
    return params, rots, drops


def _group_layers(config, attention_mask, xs):
    params, rots, drops = xs
    return [reversible_layer(jnp, params[j], kind, config, rotations=rots[j], attention_mask=attention_mask,
                             masks=drops[j], name=f"layer {j} (mod {len(params)})")
            for j, kind in enumerate(config.attention_layers[:len(params)])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stack(config, layer_params, x1, x2, rotations, attention_mask, layer_dropout):
    xs = _group_inputs(config, layer_params, rotations, layer_dropout)

    def body(carry, xs):
        return reversible_forward(_group_layers(config, attention_mask, xs), *carry), None

    return jax.lax.scan(body, (x1, x2), xs)[0]


def _stack_forward(config, layer_params, x1, x2, rotations, attention_mask, layer_dropout):
    y1, y2 = _stack(config, layer_params, x1, x2, rotations, attention_mask, layer_dropout)
    # Saved for the backward: the outputs and the explicit randomness, never the activations
    # of the layers (parameters are saved too, but they are alive anyway).
    return (y1, y2), (layer_params, y1, y2, rotations, attention_mask, layer_dropout)


def _stack_backward(config, saved, cotangents):
    layer_params, y1, y2, rotations, attention_mask, layer_dropout = saved
    xs = _group_inputs(config, layer_params, rotations, layer_dropout)

    def body(carry, xs):
        # The core's reversible backward for one group: rebuild each layer's input from its
        # output and pull the cotangents through one layer at a time with jax.vjp.
        y1, y2, d_y1, d_y2 = carry
        grads = []
        for layer in reversed(_group_layers(config, attention_mask, xs)):
            (y1, y2), (d_y1, d_y2), (d_f, d_g) = reversible_backward_step(layer, y1, y2, d_y1, d_y2, vjp=jax.vjp)
            grads.append({"attention": d_f, "feed_forward": d_g})
        return (y1, y2, d_y1, d_y2), grads[::-1]

    (_, _, d_x1, d_x2), grads = jax.lax.scan(body, (y1, y2, *cotangents), xs, reverse=True)
    if _is_scanned(layer_params):
        d_params = {"scanned": grads}
    else:
        d_params = _unstacked(grads, config.num_layers)
    # Rotations, masks and dropout masks get no gradient (zeros; None for the boolean masks).
    d_rotations = jax.tree.map(jnp.zeros_like, rotations)
    return d_params, d_x1, d_x2, d_rotations, None, None


_stack.defvjp(_stack_forward, _stack_backward)


def _check_layer_params(layer_params: Any, config: ReformerConfig):
    scanned = _is_scanned(layer_params)
    if not scanned and (not isinstance(layer_params, (list, tuple)) or len(layer_params) != config.num_layers):
        raise ValueError(f"layer_params must be params['layers'], a list of {config.num_layers} layers "
                         f"(or the scanned layout of stack_layers)")
    shapes = (scanned_shapes if scanned else param_shapes)(config)["layers"]
    layer_params = layer_params if scanned else list(layer_params)
    check_params({"layers": layer_params}, config, shapes={"layers": shapes})
    return layer_params


def reversible_stack(layer_params: Any, x1: Any, x2: Any, config: ReformerConfig, *, rotations: list,
                     attention_mask: Any = None, layer_dropout: list | None = None):
    """``(Y1, Y2)`` of the model's reversible layers, differentiable without storing activations.

    A ``jax.custom_vjp`` around a ``lax.scan`` over the layers: the forward keeps only its
    outputs (plus the explicit randomness); the backward scans the layers in reverse,
    rebuilding every layer's input from its output
    (:func:`reformer_core._model.reversible.reversible_backward_step` with ``jax.vjp`` per block).

    Args:
        layer_params: ``params["layers"]`` of :func:`reformer_core.init_params` (a list), or
            the scanned layout of :func:`stack_layers`; gradients come back in the same layout.
        x1, x2: ``(batch, length, d_model)``; the model uses the embedding for both.
        config: the model's :class:`~reformer_core.ReformerConfig` (static under jit).
        rotations: one entry per layer (None for non-LSH layers), e.g. from
            :func:`step_randomness` or :func:`rotations_from_key`.
        attention_mask: optional ``(batch, length)`` bool/int, True/1 for real tokens.
        layer_dropout: ``dropout_masks["layers"]`` of :func:`step_randomness`, or None.
    """
    _check_config(config)
    layer_params = _check_layer_params(layer_params, config)
    rotations = resolve_rotations(config, x1.shape[1], None, rotations, like=None)
    return _stack(config, layer_params, x1, x2, list(rotations), attention_mask, layer_dropout)


# ---------------------------------------------------------------- model, loss, gradient


def _check_config(config) -> None:
    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")


def _check_randomness(config, length, rotations, dropout_masks):
    if rotations is None:
        raise ValueError("rotations are an explicit input of the jax model; draw them per step with "
                         "jax_model.step_randomness(config, step, batch=..., length=..., like=params)")
    rotations = resolve_rotations(config, length, None, rotations, like=None)  # one entry per layer
    for i, (kind, rotation) in enumerate(zip(config.attention_layers, rotations)):
        if kind == "lsh" and rotation is None:  # shapes and dtypes are checked by lsh_attention
            raise ValueError(f"layer {i} is an LSH layer and needs rotations, got None")
    if dropout_masks is not None and not isinstance(dropout_masks, dict):
        raise TypeError(f"dropout_masks must be the dict from step_randomness (or None for inference), got "
                        f"{type(dropout_masks).__name__}")
    return list(rotations)


def apply(params: dict, tokens: Any, config: ReformerConfig, *, rotations: list, attention_mask: Any = None,
          dropout_masks: dict | None = None):
    """Logits ``(batch, length, vocab_size)`` of the Reformer language model, a pure function.

    Same computation as :func:`reformer_core.apply`, with the reversible stack as a
    ``jax.custom_vjp`` and every random input explicit, so it can be jitted
    (``static_argnames="config"``), differentiated, vmapped and sharded.

    Args:
        params: from :func:`reformer_core.init_params` on the jax backend.
        tokens: int ``(batch, length)``; ids are not range-checked (they are traced).
        config: the model's config (static under jit).
        rotations: one entry per layer (None for non-LSH layers).
        attention_mask: optional ``(batch, length)``, True/1 for real tokens.
        dropout_masks: the keep masks of :func:`step_randomness`; None for inference.
    """
    _check_config(config)
    _check_model_params(params, config)
    check_tokens(jnp, tokens, config, check_values=False)  # int() of traced values is impossible
    rotations = _check_randomness(config, tokens.shape[1], rotations, dropout_masks)
    masks = dropout_masks
    x = embed(jnp, params["embedding"], tokens, config, masks["embedding"] if masks else None)
    y1, y2 = _stack(config, params["layers"], x, x, rotations, attention_mask, masks["layers"] if masks else None)
    head = {"final_norm": params["final_norm"], "output": params["output"]}
    return output_head(jnp, head, y1, y2, config, masks["output"] if masks else None)


def loss(params: dict, tokens: Any, targets: Any, config: ReformerConfig, *, rotations: list, weights: Any = None,
         attention_mask: Any = None, dropout_masks: dict | None = None, ignore_index: int | None = None):
    """Mean token cross-entropy of :func:`apply` (a 0-d array, at least float32).

    ``weights``: optional ``(batch, length)`` loss weights, normalised by their sum over the
    whole (global) batch, so a batch-sharded loss equals the single-device one; zero total
    weight gives loss 0 and zero gradients. ``ignore_index``: a target value whose positions
    get weight 0. Other targets outside ``[0, vocab_size)`` raise ValueError when the targets
    are concrete; under ``jax.jit`` they are traced and cannot be checked, and such positions
    make the loss NaN (never a silently wrong class), see :func:`reformer_core.cross_entropy_loss`.
    """
    logits = apply(params, tokens, config, rotations=rotations, attention_mask=attention_mask,
                   dropout_masks=dropout_masks)
    return cross_entropy_loss(logits, targets, weights=weights, ignore_index=ignore_index)


def loss_and_grad(params: dict, tokens: Any, targets: Any, config: ReformerConfig, *, rotations: list,
                  weights: Any = None, attention_mask: Any = None, dropout_masks: dict | None = None,
                  ignore_index: int | None = None):
    """``(loss, grads)``: :func:`loss` and its gradient with respect to ``params``.

    Equals :func:`reformer_core.value_and_grad` given the same rotations and dropout
    masks. Jit it with ``jax.jit(loss_and_grad, static_argnames=("config", "ignore_index"))``
    (``ignore_index`` static when given).
    """
    return jax.value_and_grad(
        lambda p: loss(p, tokens, targets, config, rotations=rotations, weights=weights,
                       attention_mask=attention_mask, dropout_masks=dropout_masks, ignore_index=ignore_index)
    )(params)


# ---------------------------------------------------------------- randomness per step


def _like_leaf(like):
    """An array giving device and dtype: ``like`` itself, or the token table of params."""
    if isinstance(like, dict) and "embedding" in like:
        like = like["embedding"]["tokens"]
    if not isinstance(like, jax.Array):
        raise TypeError(f"like must be a jax array or the model's params, got {type(like).__name__}")
    return like


def step_randomness(config: ReformerConfig, step: int, *, batch: int, length: int, like: Any,
                    training: bool = True, batch_sharding: Any = None) -> dict:
    """The rotations and dropout masks of training step ``step``, drawn on the host.

    Rotations come from ``rotations_seed=step`` and dropout masks from ``dropout_seed=step``
    (as :func:`reformer_core.value_and_grad` draws them), in NumPy, then moved to
    ``like``'s device and dtype. Returns ``{"rotations": [...], "dropout_masks": ... or None}``,
    to be passed as keyword arguments to :func:`apply`, :func:`loss` or :func:`loss_and_grad`.

    Args:
        like: a jax array (or the params) whose device and float dtype the rotations take;
            when it is replicated over several devices, so are the rotations.
        training: False gives no dropout masks (inference).
        batch_sharding: where to put the dropout masks (e.g. the batch sharding of
            :func:`data_parallel_shardings`); default: ``like``'s device.
    """
    from reformer_core._registry import backend_for

    _check_config(config)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    for name, value in (("batch", batch), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    config.validate_length(length)
    leaf = _like_leaf(like)
    sharding = leaf.sharding
    if len(sharding.device_set) > 1:
        if not sharding.is_fully_replicated:
            raise ValueError("like= is split across devices; pass replicated params (or one of their leaves)")
        leaf = jnp.zeros((), dtype=leaf.dtype)  # draw on the default device, then replicate
    rotations = sample_rotations(config, length, step, like=leaf)
    has_dropout = config.hidden_dropout > 0 or config.attention_dropout > 0
    masks = None
    if training and has_dropout:
        masks = sample_dropout_masks(config, batch, length, step, backend=backend_for(leaf))
        if batch_sharding is not None:
            masks = jax.device_put(masks, batch_sharding)
    if len(sharding.device_set) > 1:
        rotations = jax.device_put(rotations, sharding)
    return {"rotations": rotations, "dropout_masks": masks}


def rotations_from_key(key: Any, config: ReformerConfig, length: int, *, dtype: Any = jnp.float32) -> list:
    """Rotations for every LSH layer drawn with ``jax.random`` (traceable; split the key per step).

    An alternative to the host-drawn rotations: these differ from NumPy's, so results will
    not match other backends bit for bit, but they can be drawn inside a jitted step.
    """
    _check_config(config)
    num_buckets = config.num_buckets_for(length)
    half = (sum(num_buckets) if isinstance(num_buckets, tuple) else num_buckets) // 2
    keys = jax.random.split(key, config.num_layers)
    shape = (config.num_heads, config.head_dim, config.num_hashes, half)
    return [jax.random.normal(keys[i], shape, dtype=dtype) if kind == "lsh" else None
            for i, kind in enumerate(config.attention_layers)]


# ---------------------------------------------------------------- sharding


def data_parallel_shardings(mesh: Any, axis: str = "data"):
    """``(replicated, batch_sharded)`` NamedShardings for data-parallel training on ``mesh``.

    Parameters, optimiser state and rotations are replicated; tokens, targets, weights,
    masks and dropout masks are split along their first (batch) axis over ``axis``.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(axis))

"""Training without a framework: the loss and its gradient, through the reversible stack.

The gradient is assembled from per-block vector-Jacobian products supplied by the backend:
hand-written rules on NumPy, CuPy and array_api_strict; the framework's autodiff where it
has one. Activation memory does not grow with depth (see ``reversible_backward``).
"""

from __future__ import annotations

from typing import Any

from .._arrays import check_same_device, device_of, namespace
from .autodiff import Differentiable
from .blocks import reversible_layers
from .._config import ReformerConfig
from .lm import (
    check_params,
    check_targets,
    check_tokens,
    cross_entropy_loss_vjp,
    embed,
    embed_vjp,
    output_head,
    output_head_vjp,
    resolve_rotations,
    sample_dropout_masks,
)
from .reversible import reversible_backward, reversible_forward, stored_backward

__all__ = ["value_and_grad"]


def value_and_grad(
    params: dict,
    tokens: Any,
    targets: Any,
    config: ReformerConfig,
    *,
    weights: Any = None,
    ignore_index: int | None = None,
    rotations_seed: int = 0,
    rotations: list | None = None,
    attention_mask: Any = None,
    dropout_seed: int | None = None,
    check_values: bool = True,
    reversible: bool = True,
):
    """The language-model loss and its gradient with respect to ``params``.

    ``loss = cross_entropy_loss(apply(params, tokens, ...), targets, weights=weights)``,
    with the same rotations and dropout masks in the forward and the backward.

    Args:
        params: as for :func:`apply`.
        tokens: as for :func:`apply`.
        config: as for :func:`apply`.
        rotations_seed: as for :func:`apply`.
        rotations: as for :func:`apply`.
        attention_mask: as for :func:`apply`.
        dropout_seed: as for :func:`apply`.
        check_values: as for :func:`apply`.
        targets: int ``(batch, length)``.
        weights: optional ``(batch, length)`` loss weights (e.g. 1 on the scored half).
        ignore_index: optional target value whose positions get weight 0 (e.g. -100). Any
            other target outside ``[0, vocab_size)`` raises ValueError (with ``check_values``).
            Zero total weight gives loss 0 and zero gradients; see :func:`cross_entropy_loss`.
        reversible: rebuild activations layer by layer (memory flat in depth); False stores
            every layer's activations instead (the ordinary way, for comparison).

    Returns:
        ``(loss, grads)``: a 0-d array and a pytree shaped like ``params``.
    """
    from .._registry import backend_for

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    check_params(params, config)
    table = params["embedding"]["tokens"]
    xp = namespace(tokens, targets, table, weights, attention_mask)
    check_tokens(xp, tokens, config, check_values)
    if tuple(targets.shape) != tuple(tokens.shape):
        raise ValueError(f"targets must have the tokens' shape {tuple(tokens.shape)}, got {tuple(targets.shape)}")
    if not xp.isdtype(targets.dtype, "integral"):
        raise TypeError(f"targets must be integers, got {targets.dtype}")
    if check_values:  # before any work: the loss is computed after the whole forward
        check_targets(xp, targets, config.vocab_size, ignore_index)
    check_same_device({"tokens": tokens, "targets": targets, "params": table, "weights": weights,
                       "attention_mask": attention_mask})
    backend = backend_for(table)
    batch, length = tokens.shape
    masks = sample_dropout_masks(config, batch, length, dropout_seed, backend=backend) if dropout_seed is not None else None
    vjp = backend.vjp

    embed_fn = Differentiable(
        lambda p: embed(xp, p, tokens, config, masks and masks["embedding"]),
        lambda p: _single(embed_vjp(xp, p, tokens, config, masks and masks["embedding"])),
        "embedding",
    )
    head_params = {"final_norm": params["final_norm"], "output": params["output"]}
    head_keep = masks and masks["output"]

    def head_loss(p, y):
        y1, y2 = y
        logits = output_head(xp, p, y1, y2, config, head_keep)
        return cross_entropy_loss_vjp(logits, targets, weights=weights, ignore_index=ignore_index,
                                      check_values=False, with_pullback=False)[0]

    def head_loss_rule(p, y):
        logits, head_pullback = output_head_vjp(xp, p, y[0], y[1], config, head_keep)
        loss, loss_pullback = cross_entropy_loss_vjp(logits, targets, weights=weights, ignore_index=ignore_index,
                                                     check_values=False)

        def pullback(d_loss):
            d_p, d_y1, d_y2 = head_pullback(loss_pullback(d_loss))
            return d_p, (d_y1, d_y2)

        return loss, pullback

    head_fn = Differentiable(head_loss, head_loss_rule, "output head and loss")

    x, embed_pullback = vjp(embed_fn, params["embedding"])
    rotations = resolve_rotations(config, length, rotations_seed, rotations, like=x)
    layers = reversible_layers(xp, params, config, rotations=rotations, attention_mask=attention_mask,
                               dropout_masks=masks)
    one = xp.ones((), dtype=xp.result_type(x.dtype, xp.float32), device=device_of(x))
    if reversible:
        y1, y2 = reversible_forward(layers, x, x)
        loss, head_pullback = vjp(head_fn, head_params, (y1, y2))
        d_head, (d_y1, d_y2) = head_pullback(one)
        _, (d_x1, d_x2), layer_grads = reversible_backward(layers, y1, y2, d_y1, d_y2, vjp=vjp)
    else:
        results = {}

        def output_cotangents(y1, y2):
            results["loss"], head_pullback = vjp(head_fn, head_params, (y1, y2))
            results["d_head"], d_y = head_pullback(one)
            return d_y

        _, (d_x1, d_x2), layer_grads = stored_backward(layers, x, x, output_cotangents, vjp=vjp)
        loss, d_head = results["loss"], results["d_head"]
    (d_embedding,) = embed_pullback(d_x1 + d_x2)
    grads = {
        "embedding": d_embedding,
        "layers": [{"attention": d_f, "feed_forward": d_g} for d_f, d_g in layer_grads],
        "final_norm": d_head["final_norm"],
        "output": d_head["output"],
    }
    return loss, grads


def _single(result):
    """Adapt a ``(out, pullback -> grads)`` rule of one argument to the tuple convention."""
    out, pullback = result
    return out, lambda d_out: (pullback(d_out),)

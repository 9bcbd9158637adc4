"""The two blocks of a reversible layer, with their hand-written VJPs.

``F = Dropout(Attention(LayerNorm(x)))`` and ``G = Dropout(FeedForward(LayerNorm(x)))``,
each a :class:`Differentiable` function of ``(params, x)`` with the layer's randomness
(rotations, dropout masks) and the padding mask bound in.
"""

from __future__ import annotations

from .._tree import tree_add
from .autodiff import Differentiable
from .._config import ReformerConfig
from .._attention.full import full_attention, full_attention_vjp
from .layers import chunk_slices, dense_vjp, dropout, feed_forward, feed_forward_vjp, layer_norm, layer_norm_vjp
from .._attention.local import local_attention, local_attention_vjp
from .._attention.lsh import lsh_attention, lsh_attention_vjp
from .reversible import ReversibleLayer

__all__ = ["attention_block", "feed_forward_block", "reversible_layers", "split_heads", "merge_heads"]


def split_heads(xp, x, heads):
    """``(batch, length, heads * head_dim) -> (batch, heads, length, head_dim)``."""
    batch, length, inner = x.shape
    return xp.permute_dims(xp.reshape(x, (batch, length, heads, inner // heads)), (0, 2, 1, 3))


def merge_heads(xp, x):
    """``(batch, heads, length, head_dim) -> (batch, length, heads * head_dim)``."""
    batch, heads, length, head_dim = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (batch, length, heads * head_dim))


def _attention_call(kind, config: ReformerConfig, length, rotations, attention_mask, probs_keep, vjp):
    """The attention function of ``kind`` and its keyword arguments; inputs are projections."""
    common = {"causal": config.causal, "attention_mask": attention_mask,  # no masks: no dropout (evaluation)
              "dropout_rate": config.attention_dropout if probs_keep is not None else 0.0, "dropout_keep": probs_keep}
    if kind == "lsh":
        kwargs = {**common, "num_buckets": config.num_buckets_for(length), "chunk_length": config.lsh_chunk_length,
                  "num_chunks_before": config.lsh_num_chunks_before,
                  "num_chunks_after": config.lsh_num_chunks_after,
                  "duplicate_correction": config.duplicate_correction}
        fn = lsh_attention_vjp if vjp else lsh_attention
        return (lambda qk, v: fn(qk, v, rotations, **kwargs)), ("qk", "v")
    if kind == "full":
        fn = full_attention_vjp if vjp else full_attention
        return (lambda qk, v: fn(qk, v, **common)), ("qk", "v")
    kwargs = {**common, "chunk_length": config.local_chunk_length,
              "num_chunks_before": config.local_num_chunks_before,
              "num_chunks_after": config.local_num_chunks_after}
    fn = local_attention_vjp if vjp else local_attention
    return (lambda q, k, v: fn(q, k, v, **kwargs)), ("q", "k", "v")


def attention_block(xp, params, x, kind, config, *, rotations=None, attention_mask=None, probs_keep=None):
    """``Attention(LayerNorm(x))`` of one layer: ``(batch, length, d_model)`` in and out."""
    h = layer_norm(xp, x, params["norm"], config.layer_norm_eps)
    attend, names = _attention_call(kind, config, x.shape[1], rotations, attention_mask, probs_keep, vjp=False)
    heads = [split_heads(xp, xp.matmul(h, params[name]), config.num_heads) for name in names]
    return xp.matmul(merge_heads(xp, attend(*heads)), params["out"])


def attention_block_vjp(xp, params, x, kind, config, *, rotations=None, attention_mask=None, probs_keep=None):
    """``(attention_block(...), pullback)``; ``pullback(d_out) -> (d_params, d_x)``."""
    h, norm_pullback = layer_norm_vjp(xp, x, params["norm"], config.layer_norm_eps)
    attend, names = _attention_call(kind, config, x.shape[1], rotations, attention_mask, probs_keep, vjp=True)
    projections = [dense_vjp(xp, h, {"weight": params[name]}) for name in names]
    attended, attend_pullback = attend(*(split_heads(xp, p, config.num_heads) for p, _ in projections))
    out, out_pullback = dense_vjp(xp, merge_heads(xp, attended), {"weight": params["out"]})

    def pullback(d_out):
        d_out_params, d_attended = out_pullback(d_out)
        d_heads = attend_pullback(split_heads(xp, d_attended, config.num_heads))
        grads, d_h = {"out": d_out_params["weight"]}, None
        for name, (_, pull), d_head in zip(names, projections, d_heads):
            d_weight, d_from = pull(merge_heads(xp, d_head))
            grads[name] = d_weight["weight"]
            d_h = d_from if d_h is None else d_h + d_from
        grads["norm"], d_x = norm_pullback(d_h)
        return grads, d_x

    return out, pullback


def _feed_forward_piece(xp, params, x, config):
    h = layer_norm(xp, x, params["norm"], config.layer_norm_eps)
    return feed_forward(xp, h, params, activation_name=config.ff_activation)


def _feed_forward_piece_vjp(xp, params, x, config):
    h, norm_pullback = layer_norm_vjp(xp, x, params["norm"], config.layer_norm_eps)
    out, ff_pullback = feed_forward_vjp(xp, h, params, activation_name=config.ff_activation)

    def pullback(d_out):
        grads, d_h = ff_pullback(d_out)
        grads["norm"], d_x = norm_pullback(d_h)
        return grads, d_x

    return out, pullback


def feed_forward_block(xp, params, x, config):
    """``FeedForward(LayerNorm(x))``, ``config.ff_chunk_length`` positions at a time."""
    pieces = chunk_slices(x, config.ff_chunk_length)
    if len(pieces) == 1:
        return _feed_forward_piece(xp, params, x, config)
    return xp.concat([_feed_forward_piece(xp, params, piece, config) for piece in pieces], axis=1)


def feed_forward_block_vjp(xp, params, x, config):
    """``(feed_forward_block(...), pullback)``; ``pullback(d_out) -> (d_params, d_x)``.

    With ``ff_chunk_length`` set, the pullback recomputes each chunk's forward and runs its
    backward before the next, so peak memory does not grow with the sequence length.
    """
    pieces = chunk_slices(x, config.ff_chunk_length)
    if len(pieces) == 1:
        return _feed_forward_piece_vjp(xp, params, x, config)
    out = xp.concat([_feed_forward_piece(xp, params, piece, config) for piece in pieces], axis=1)

    def pullback(d_out):
        grads, d_xs = None, []
        for piece, d_piece in zip(pieces, chunk_slices(d_out, config.ff_chunk_length)):
            _, piece_pullback = _feed_forward_piece_vjp(xp, params, piece, config)
            piece_grads, d_x = piece_pullback(d_piece)
            grads = tree_add(grads, piece_grads)
            d_xs.append(d_x)
        return grads, xp.concat(d_xs, axis=1)

    return out, pullback


def _with_dropout(xp, forward, forward_vjp, keep, rate, name):
    """``Dropout(forward(params, x))`` as a Differentiable of ``(params, x)``."""

    def run(params, x):
        return dropout(xp, forward(params, x), keep, rate)

    def rule(params, x):
        out, pullback = forward_vjp(params, x)
        return dropout(xp, out, keep, rate), lambda d_out: pullback(dropout(xp, d_out, keep, rate))

    return Differentiable(run, rule, name)


def reversible_layer(xp, layer_params, kind, config, *, rotations=None, attention_mask=None, masks=None,
                     name="layer"):
    """One layer of the stack as a :class:`ReversibleLayer`, its randomness and masks bound in.

    ``layer_params``: one entry of ``params["layers"]``; ``kind``: its attention kind;
    ``rotations``: its LSH rotations (None for other kinds); ``masks``: its entry of
    ``dropout_masks["layers"]`` (or None). Backends that loop over layers themselves (JAX's
    scanned stack) build each layer with this.
    """
    masks = masks or {}
    bound = {"rotations": rotations, "attention_mask": attention_mask, "probs_keep": masks.get("attention_probs")}
    f = _with_dropout(
        xp,
        lambda p, x: attention_block(xp, p, x, kind, config, **bound),
        lambda p, x: attention_block_vjp(xp, p, x, kind, config, **bound),
        masks.get("attention"), config.hidden_dropout, f"{name} {kind} attention",
    )
    g = _with_dropout(
        xp,
        lambda p, x: feed_forward_block(xp, p, x, config),
        lambda p, x: feed_forward_block_vjp(xp, p, x, config),
        masks.get("feed_forward"), config.hidden_dropout, f"{name} feed-forward",
    )
    return ReversibleLayer(f, g, layer_params["attention"], layer_params["feed_forward"])


def reversible_layers(xp, params, config, *, rotations, attention_mask=None, dropout_masks=None):
    """The model's stack as :class:`ReversibleLayer` s, randomness and masks bound in."""
    return [
        reversible_layer(xp, params["layers"][i], kind, config, rotations=rotations[i], attention_mask=attention_mask,
                         masks=dropout_masks["layers"][i] if dropout_masks else None, name=f"layer {i}")
        for i, kind in enumerate(config.attention_layers)
    ]

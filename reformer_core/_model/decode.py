"""The cached model behind :func:`~reformer_core.generate`: a prefill and a decode step.

The prompt runs once through the whole model (padded like ``apply`` pads it), filling a
cache per layer; each new token then runs through the layers alone, attending to the cache:

* local attention keeps past keys and values, only as far back as the next query's window
  reaches (all of them when ``local_num_chunks_after > 0``, whose window wraps to the start);
* full attention keeps past (normalised) shared-QK keys and values;
* LSH attention keeps past keys, values and their buckets, hashed once with rotations fixed
  for the whole generation. A step sorts the cached buckets with the new one and takes the
  new query's windows exactly as ``apply`` would on the padded prefix (rounds, chunks that
  span rounds, look-back that wraps, the padding bucket), an O(L log L) selection instead of
  the O(L^2)-per-token recompute of the prefix.

Layer norms and feed-forwards are position-wise, so a step computes only the new row.
The step functions take the position as an int or as a 0-d integer array, and reach the
caches through :class:`Run`'s hooks, so a compiled loop with fixed-size caches (JAX:
``backends/jax/generate.py``) runs the same code with a traced position.
What is exact and what is not is in ``docs/numerics.md`` ("Cached generation").
"""

from __future__ import annotations

import math

from .._arrays import device_of, gather_positions
from .._attention.attend import attend, shared_qk_keys
from .._attention.full import full_attention
from .._attention.hashing import compute_buckets
from .._attention.local import local_attention
from .._attention.lsh import lsh_attention
from .._attention.rounds import combine_rounds
from .._config import ReformerConfig
from .blocks import feed_forward_block, merge_heads
from .embedding import token_embedding
from .layers import dense, layer_norm
from .lm import embed, output_head

__all__ = ["generation_config", "padded_length", "Run", "prefill", "decode_step"]


# ---------------------------------------------------------------- what generation reproduces


def generation_config(config: ReformerConfig) -> ReformerConfig:
    """The config whose :func:`apply` cached generation reproduces.

    ``config`` itself when ``num_buckets`` is set. With ``num_buckets=None`` the bucket
    count of ``apply`` depends on the sequence length, so no cache hashed once could follow
    it; generation then fixes it to ``config.num_buckets_for(config.max_length)`` (the count
    for the longest sequence the model takes, usually its training length) and draws the
    rotations ``apply`` draws for that length: ``config.replace(num_buckets=...)``.
    """
    if config.num_buckets is not None or "lsh" not in config.attention_layers:
        return config
    return config.replace(num_buckets=config.num_buckets_for(config.max_length))


def padded_length(config: ReformerConfig, length: int) -> int:
    """``length`` rounded up to a multiple of every chunk length the layers use (their lcm):
    the padded prefix whose ``apply`` a generation step reproduces (``length`` itself for a
    model of full-attention layers only)."""
    multiple = 1
    kinds = set(config.attention_layers)
    if "lsh" in kinds:
        multiple = math.lcm(multiple, config.lsh_chunk_length)
    if "local" in kinds:
        multiple = math.lcm(multiple, config.local_chunk_length)
    return -(-length // multiple) * multiple


# ---------------------------------------------------------------- the model, cached


class Run:
    """What every step needs: the namespace, the config, the parameters, the rotations, and
    how the caches grow.

    This class grows them by concatenation, so they hold exactly the positions written so far
    and positions are Python ints. A compiled loop (``backends/jax/generate.py``) subclasses it
    with fixed-size caches written in place and a traced position; the step functions below
    are written once for both: their position arithmetic (``padded_length``, chunk numbers,
    windows) runs on ints or 0-d integer arrays alike.
    """

    def __init__(self, xp, params, config, rotations):
        self.xp, self.params, self.config, self.rotations = xp, params, config, rotations
        self.device = device_of(params["embedding"]["tokens"])
        self.num_buckets = config.num_buckets_for(config.max_length) if "lsh" in config.attention_layers else None
        self._constants = {}
        self.weights = {}  # derived from params once per run (the fused projection weights)

    def ints(self, values):
        return self.xp.asarray(values, dtype=self.xp.int64, device=self.device)

    def constant(self, key, make):
        """An int64 array that depends only on ``key`` (config constants), made once per run:
        a step then creates no host-to-device copies of index tables."""
        cached = self._constants.get(key)
        if cached is None:
            cached = self._constants[key] = self.ints(make())
        return cached

    def positions(self, position):
        """``position`` as an int ``(1,)`` array (a compiled loop's subclass takes a 0-d array)."""
        return self.ints([position])

    def write(self, cache, name, new, axis, position):
        """Store ``new`` (one position along ``axis``) at ``position``: here appended."""
        cache[name] = self.xp.concat([cache[name], new], axis=axis)

    def trim_local(self, cache, next_position):
        """Drop the local keys and values no query from ``next_position`` on can see."""
        return _trim_local(self.xp, cache, _local_start(self.config, next_position))

    def branch(self, condition, if_true, if_false):
        """``if_true()`` where ``condition`` holds, else ``if_false()``."""
        return if_true() if condition else if_false()


def _projections(run, layer_index, h, names):
    """The ``names`` projections of ``h (batch, length, d_model)``, heads split: one matmul by
    their weights side by side (concatenated once per run), then one reshape and transpose."""
    xp, heads = run.xp, run.config.num_heads
    key = ("projection weights", layer_index)
    weight = run.weights.get(key)
    if weight is None:
        attention = run.params["layers"][layer_index]["attention"]
        weight = run.weights[key] = xp.concat([attention[name] for name in names], axis=1)
    batch, length, _ = h.shape
    both = xp.reshape(dense(xp, h, {"weight": weight}), (batch, length, len(names), heads, -1))
    both = xp.permute_dims(both, (2, 0, 3, 1, 4))  # (names, batch, heads, length, head_dim)
    return [both[j, ...] for j in range(len(names))]


def _finish_layer(run, layer_params, x1, x2, attended):
    """``Y1 = X1 + out(attended)``, ``Y2 = X2 + FeedForward(LayerNorm(Y1))``."""
    xp = run.xp
    y1 = x1 + dense(xp, merge_heads(xp, attended), {"weight": layer_params["attention"]["out"]})
    return y1, x2 + feed_forward_block(xp, layer_params["feed_forward"], y1, run.config)


def _local_start(config, next_position):
    """The first position the query at ``next_position`` (or later) can see in local attention."""
    if config.local_num_chunks_after:
        return 0  # its window wraps forward onto the first chunks
    chunk = config.local_chunk_length
    return max(0, (next_position // chunk - config.local_num_chunks_before) * chunk)


def _trim_local(xp, cache, start):
    drop = start - cache["start"]
    if drop > 0:
        cache["k"], cache["v"], cache["start"] = cache["k"][:, :, drop:, :], cache["v"][:, :, drop:, :], start
    return cache


def prefill(run, tokens, length):
    """Run the prompt (padded like ``apply`` pads it) through the model; fill the caches.

    Returns ``(logits of the last prompt position (batch, vocab), caches)``.
    """
    xp, config, params = run.xp, run.config, run.params
    batch = tokens.shape[0]
    padded = padded_length(config, length)
    mask = None
    if padded > length:
        filler = xp.zeros((batch, padded - length), dtype=tokens.dtype, device=run.device)
        tokens = xp.concat([tokens, filler], axis=1)
        positions = xp.arange(padded, dtype=xp.int64, device=run.device)
        mask = xp.broadcast_to((positions < length)[None, :], (batch, padded))
    x = embed(xp, params["embedding"], tokens, config)
    x1 = x2 = x
    caches = []
    causal = {"causal": True, "attention_mask": mask}
    for i, kind in enumerate(config.attention_layers):
        layer = params["layers"][i]
        h = layer_norm(xp, x2, layer["attention"]["norm"], config.layer_norm_eps)
        if kind == "local":
            q, k, v = _projections(run, i, h, ("q", "k", "v"))
            attended = local_attention(q, k, v, chunk_length=config.local_chunk_length,
                                       num_chunks_before=config.local_num_chunks_before,
                                       num_chunks_after=config.local_num_chunks_after, **causal)
            cache = {"k": k[:, :, :length, :], "v": v[:, :, :length, :], "start": 0}
            caches.append(run.trim_local(cache, length))
        else:
            qk, v = _projections(run, i, h, ("qk", "v"))
            cache = {"keys": shared_qk_keys(xp, qk[:, :, :length, :]), "v": v[:, :, :length, :]}
            if kind == "full":
                attended = full_attention(qk, v, **causal)
            else:
                attended = lsh_attention(qk, v, run.rotations[i], num_buckets=run.num_buckets,
                                         chunk_length=config.lsh_chunk_length,
                                         num_chunks_before=config.lsh_num_chunks_before,
                                         num_chunks_after=config.lsh_num_chunks_after,
                                         duplicate_correction=config.duplicate_correction, **causal)
                cache["buckets"] = compute_buckets(xp, qk[:, :, :length, :], run.rotations[i], run.num_buckets, None)
            caches.append(cache)
        x1, x2 = _finish_layer(run, layer, x1, x2, attended)
    last = slice(length - 1, length)
    logits = output_head(xp, params, x1[:, last, :], x2[:, last, :], config)
    return logits[:, 0, :], caches


def _position_embedding(xp, axial, position):
    """The axial positional embedding of one position (an int or a 0-d integer array),
    ``(1, d_model)``."""
    shape = [w.shape[0] for w in axial]
    parts = []
    for axis, table in enumerate(axial):
        index = (position // math.prod(shape[axis + 1:])) % shape[axis]
        parts.append(table[index:index + 1, :] if isinstance(index, int)
                     else xp.take(table, xp.reshape(index, (1,)), axis=0))
    return xp.concat(parts, axis=-1)


def decode_step(run, caches, token, position):
    """One new token ``(batch, 1)`` at ``position`` (an int, or a 0-d integer array in a
    compiled loop): update the caches, return its logits."""
    xp, config, params = run.xp, run.config, run.params
    x = token_embedding(xp, token, params["embedding"]["tokens"])
    x = x + _position_embedding(xp, params["embedding"]["axial"], position)
    x1 = x2 = x
    padded = padded_length(config, position + 1)
    for i, kind in enumerate(config.attention_layers):
        layer, cache = params["layers"][i], caches[i]
        h = layer_norm(xp, x2, layer["attention"]["norm"], config.layer_norm_eps)
        if kind == "local":
            q, k, v = _projections(run, i, h, ("q", "k", "v"))
            run.write(cache, "k", k, 2, position)
            run.write(cache, "v", v, 2, position)
            attended = _local_step(run, cache, q, position, padded)
            run.trim_local(cache, position + 1)
        else:
            qk, v = _projections(run, i, h, ("qk", "v"))
            run.write(cache, "keys", shared_qk_keys(xp, qk), 2, position)
            run.write(cache, "v", v, 2, position)
            if kind == "full":
                attended = _full_step(run, cache, qk, position)
            else:
                bucket = compute_buckets(xp, qk, run.rotations[i], run.num_buckets, None)
                run.write(cache, "buckets", bucket, 3, position)
                attended = run.branch(padded <= config.lsh_chunk_length,
                                      lambda: _full_step(run, cache, qk, position),
                                      lambda: _lsh_step(run, cache, qk, bucket, position, padded))
        x1, x2 = _finish_layer(run, layer, x1, x2, attended)
    return output_head(xp, params, x1, x2, config)[:, 0, :]


def _local_step(run, cache, q, position, padded):
    """The new query against exactly the keys its chunked window holds in the padded prefix.

    With several chunks the window is look_adjacent's: chunks ``own - before .. own + after``
    modulo the number of chunks (a window that wraps onto one chunk twice holds its keys twice,
    as the recompute does). With one chunk (``padded <= chunk``) the recompute attends to every
    key once: the same window, whose copies after the first are masked out.
    """
    xp, config = run.xp, run.config
    chunk = config.local_chunk_length
    before, after = config.local_num_chunks_before, config.local_num_chunks_after
    span = before + 1 + after
    num_chunks, own = padded // chunk, position // chunk
    start = cache["start"]
    if isinstance(position, int) and not after and (num_chunks == 1 or num_chunks >= span):
        # The window's keys the causal mask keeps are then exactly the positions from its
        # first chunk (or 0) through the query, each once: the wrapped chunks lie after the
        # query, and with one chunk only its first copy counts. A slice, no masks.
        low = 0 if num_chunks == 1 else max(0, own - before) * chunk
        seen = slice(low - start, position + 1 - start)
        keys, values = cache["k"][:, :, seen, :], cache["v"][:, :, seen, :]
        out, _ = attend(xp, q * (1.0 / math.sqrt(q.shape[-1])), keys, values, query_positions=None,
                        key_positions=None, causal=False)
        return out
    copy = run.constant(("local copy",), lambda: [w // chunk for w in range(span * chunk)])  # adjacent chunk of a slot
    within = run.constant(("local within",), lambda: [w % chunk for w in range(span * chunk)])
    window = ((own - before + before * num_chunks + copy) % num_chunks) * chunk + within  # (W,) positions
    kept = 1 + (num_chunks > 1) * (span - 1)  # copies that count: all, or the first with one chunk
    keep = None if isinstance(kept, int) and kept == span else copy < kept
    if start and start > max(0, own - before) * chunk:  # the lowest position the window can see
        raise AssertionError("local cache was trimmed below the window")  # a bug, never user input
    index = xp.where(window <= position, window - start, xp.zeros_like(window))
    keys, values = xp.take(cache["k"], index, axis=2), xp.take(cache["v"], index, axis=2)
    out, _ = attend(xp, q * (1.0 / math.sqrt(q.shape[-1])), keys, values,
                    query_positions=run.positions(position), key_positions=window, causal=True, key_keep=keep)
    return out


def _full_step(run, cache, qk, position):
    """Shared-QK attention of the new query over every cached key (self mask, causal: slots
    after ``position``, which a fixed-size cache has not written yet, are masked)."""
    xp = run.xp
    out, _ = attend(xp, qk, cache["keys"], cache["v"], query_positions=run.positions(position),
                    key_positions=xp.arange(cache["keys"].shape[2], dtype=xp.int64, device=run.device),
                    causal=True, self_mask=True)
    return out


def _lsh_step(run, cache, qk, bucket, position, padded):
    """LSH attention of the new query ``qk`` (bucket ``bucket``), the last real position of the
    padded prefix.

    Per round r the prefix's sorted order is: the real positions by (bucket, position), then
    the padding positions (their extra bucket sorts last) in position order, so rank k >= n
    is padding position k. The new query, the last real position, sits at rank
    ``#{j < t: bucket_j <= bucket_t}``, slot ``r * padded + rank``; its window is the chunks
    ``slot // c - before .. slot // c + after`` modulo the number of chunks over all rounds,
    whose slots map back to (round, rank) and so to positions. Those keys, with duplicates,
    the causal mask (which hides padding: it lies after the query) and the self mask, are
    exactly what the recompute's chunked attention gives this query.

    The cache may be longer than the positions written (``0 .. position``): a fixed-size cache
    holds, in its unwritten slots, a bucket above every real one, which the stable sort puts
    after the real positions and the rank does not count.
    """
    xp, config = run.xp, run.config
    chunk, before, after = config.lsh_chunk_length, config.lsh_num_chunks_before, config.lsh_num_chunks_after
    buckets = cache["buckets"]  # (b, h, n, capacity), round offsets included
    batch, heads, rounds, capacity = buckets.shape
    width = chunk * (before + 1 + after)
    num_chunks = rounds * padded // chunk
    order = xp.astype(xp.argsort(buckets, axis=-1, stable=True), xp.int64)  # rank -> position, per round
    rank = xp.sum(xp.astype(buckets <= bucket, xp.int64), axis=-1) - 1  # (b, h, n); the new one counts itself
    slot = run.constant(("lsh rounds", rounds), lambda: list(range(rounds))) * padded + rank
    offsets = run.constant(("lsh offsets",), lambda: [w // chunk - before for w in range(width)]) + before * num_chunks
    within = run.constant(("lsh within",), lambda: [w % chunk for w in range(width)])
    slots = ((slot // chunk)[..., None] + offsets) % num_chunks * chunk + within  # (b, h, n, W)
    item_round, item_rank = slots // padded, slots % padded
    real = item_rank < position + 1
    flat_order = xp.reshape(order, (batch, heads, rounds * capacity))
    index = item_round * capacity + xp.where(real, item_rank, xp.zeros_like(item_rank))
    found = xp.reshape(xp.take_along_axis(flat_order, xp.reshape(index, (batch, heads, rounds * width)), axis=-1),
                       (batch, heads, rounds, width))
    key_positions = xp.where(real, found, item_rank)  # padding rank k holds padding position k
    gather = xp.reshape(xp.where(real, found, xp.zeros_like(found)), (batch, heads, rounds * width))
    head_dim = qk.shape[-1]
    keys = xp.reshape(gather_positions(xp, cache["keys"], gather), (batch, heads, rounds, width, head_dim))
    values = xp.reshape(gather_positions(xp, cache["v"], gather), (batch, heads, rounds, width, head_dim))
    bias = None
    if config.duplicate_correction and rounds > 1:
        # N_ij: how often key j occurs among all of this query's window items, every round.
        flat = xp.reshape(key_positions, (batch, heads, rounds * width))
        counts = xp.sum(xp.astype(flat[..., :, None] == flat[..., None, :], qk.dtype), axis=-1)
        bias = -xp.log(xp.reshape(counts, (batch, heads, rounds, 1, width)))
    query = xp.broadcast_to(qk[:, :, None, :, :], (batch, heads, rounds, 1, head_dim))
    out, lse = attend(xp, query, keys, values,
                      query_positions=xp.full((batch, heads, rounds, 1), position, dtype=xp.int64, device=run.device),
                      key_positions=key_positions, causal=True, self_mask=True, logit_bias=bias)
    return combine_rounds(xp, out, lse)  # (b, h, 1, d)

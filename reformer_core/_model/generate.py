"""Cached autoregressive generation: :func:`generate`.

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
caches through ``Run``'s hooks, so a compiled loop with fixed-size caches (JAX:
``backends/jax/generate.py``) runs the same code with a traced position.
What is exact and what is not is in ``docs/numerics.md`` ("Cached generation").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._arrays import check_same_device, device_of, gather_positions, namespace
from .._attention.attend import attend, shared_qk_keys
from .._attention.full import full_attention
from .._attention.hashing import compute_buckets
from .._attention.local import local_attention
from .._attention.lsh import lsh_attention
from .._attention.rounds import combine_rounds
from .._config import ReformerConfig
from .._tree import tree_map
from .blocks import feed_forward_block, merge_heads, split_heads
from .embedding import token_embedding
from .layers import layer_norm
from .lm import check_params, embed, output_head, sample_rotations

__all__ = [
    "generate", "generation_config", "padded_length", "choose_tokens", "cached_logits",
    # the pieces a compiled decode loop reuses (backends/jax/generate.py)
    "check_generate_args", "sampling_filters", "sample_with_uniforms", "Run", "prefill", "decode_step",
]


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


# ---------------------------------------------------------------- validation


def _check_int(name: str, value: Any, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}; {hint}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}; {hint}")


def _check_options(config, temperature, top_k, top_p, eos_token_id, seed, rotations_seed, max_new_tokens):
    _check_int("max_new_tokens", max_new_tokens, 0, "pass how many tokens to generate, e.g. 64")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
        raise TypeError(f"temperature must be a float >= 0 (0 for greedy decoding), got {temperature!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0 (0 for greedy decoding), got {temperature!r}")
    if top_k is not None:
        _check_int("top_k", top_k, 1, "pass None to sample from the whole vocabulary, or k >= 1 (1 is greedy)")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)):
            raise TypeError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (the nucleus' probability mass), got {top_p!r}; "
                             f"pass None (or 1.0) to switch nucleus sampling off")
    if eos_token_id is not None:
        _check_int("eos_token_id", eos_token_id, 0, "pass a token id in [0, vocab_size) or None")
        if eos_token_id >= config.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is not a token id: the vocabulary has "
                             f"{config.vocab_size} ids, [0, {config.vocab_size})")
    _check_int("seed", seed, 0, "the sampling seed is a non-negative int")
    _check_int("rotations_seed", rotations_seed, 0, "pass the rotations_seed you give reformer_core.apply")


def _check_prompt(xp, prompt, config, max_new_tokens, host):
    if prompt.ndim not in (1, 2):
        raise ValueError(f"prompt must have shape (batch, prompt_length) or (prompt_length,), "
                         f"got {tuple(prompt.shape)}")
    if not xp.isdtype(prompt.dtype, "integral"):
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}; "
                        f"cast it with xp.astype(prompt, xp.int64)")
    batch, length = (1, prompt.shape[0]) if prompt.ndim == 1 else tuple(prompt.shape)
    if length == 0 or batch == 0:
        raise ValueError(f"prompt is empty (shape {tuple(prompt.shape)}); generation needs at least one token "
                         f"per sequence to start from (e.g. a beginning-of-text id)")
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                         f"[{low}, {high}]")
    total = length + max_new_tokens
    if total > config.max_length:
        raise ValueError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} = {total} exceeds the model's maximum "
            f"length prod(axial_pos_shape)={config.max_length}; shorten the prompt, ask for at most "
            f"{max(config.max_length - length, 0)} new tokens, or use a model with a larger axial_pos_shape"
        )
    longest = padded_length(config, total - 1 if max_new_tokens else length)
    if longest > config.max_length:
        raise ValueError(
            f"the last step's prefix, padded to a multiple of the chunk lengths, has {longest} positions, more than "
            f"prod(axial_pos_shape)={config.max_length}; the model cannot run it: generate fewer tokens (at most "
            f"{max(config.max_length // padded_length(config, 1) * padded_length(config, 1) - length + 1, 0)} here)"
        )
    return batch, length


# ---------------------------------------------------------------- choosing tokens


def sampling_filters(vocab: int, temperature: float, top_k: int | None, top_p: float | None):
    """``(greedy, top_k, top_p)`` with the filters that keep everything switched off (None):
    ``top_k >= vocab`` and ``top_p == 1`` keep every token, so they are skipped."""
    greedy = temperature == 0
    top_k = top_k if top_k is not None and top_k < vocab else None
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    return greedy, top_k, top_p


def sample_with_uniforms(xp, logits: Any, u: Any, temperature: Any, top_k: Any = None, top_p: Any = None):
    """The tokens sampling picks from float ``logits (batch, vocab)`` with the uniform numbers
    ``u (batch,)``, written once for the host (NumPy, float64) and for compiled loops.

    The logits are divided by ``temperature``; ``top_k`` keeps the k largest (ties to the lower
    id: ranks come from a stable sort); ``top_p`` then keeps the smallest set of most probable
    tokens whose probability reaches it; ``u * total`` picks a token by the inverse CDF of the
    kept probabilities (``searchsorted(cdf, u * cdf[-1], side="right")``, i.e. the number of
    CDF entries ``<= u * cdf[-1]``: the CDF of non-negative numbers never decreases), clipped
    to ``vocab - 1``. ``temperature``, ``top_k``, ``top_p`` may be traced scalars; None (see
    :func:`sampling_filters`) switches a filter off.
    """
    vocab = logits.shape[-1]
    z = logits / temperature
    if top_k is not None:
        order = xp.argsort(-z, axis=-1, stable=True)
        ranks = xp.argsort(order, axis=-1)  # the inverse permutation: each token's rank
        z = xp.where(ranks < top_k, z, xp.asarray(-math.inf, dtype=z.dtype))
    probs = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    probs = probs / xp.sum(probs, axis=-1, keepdims=True)
    if top_p is not None:
        order = xp.argsort(-probs, axis=-1, stable=True)
        ranked = xp.take_along_axis(probs, order, axis=-1)
        before = xp.cumulative_sum(ranked, axis=-1) - ranked
        nucleus = xp.take_along_axis(before < top_p, xp.argsort(order, axis=-1), axis=-1)
        probs = xp.where(nucleus, probs, xp.zeros_like(probs))
        probs = probs / xp.sum(probs, axis=-1, keepdims=True)
    cdf = xp.cumulative_sum(probs, axis=-1)
    picks = xp.sum(xp.astype(cdf <= (u * cdf[:, -1])[:, None], xp.int64), axis=-1)
    return xp.minimum(picks, vocab - 1)


def choose_tokens(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """The next token of each row of float ``logits (batch, vocab)``, on the host, in float64.

    ``temperature == 0``: greedy, the first index of the largest logit (no random numbers are
    drawn). Otherwise the logits are divided by ``temperature``; ``top_k`` keeps the k largest
    (ties to the lower id, so ``top_k=1`` is greedy); ``top_p`` then keeps the smallest set of
    most probable tokens whose probability reaches ``top_p``; one uniform number per row from
    ``rng`` (``rng.random(batch)``) picks a token by the inverse CDF of the kept, renormalised
    probabilities (:func:`sample_with_uniforms`).
    """
    logits = np.asarray(logits, dtype=np.float64)
    batch, vocab = logits.shape
    greedy, top_k, top_p = sampling_filters(vocab, temperature, top_k, top_p)
    if greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    picks = sample_with_uniforms(namespace(logits), logits, rng.random(batch), float(temperature), top_k, top_p)
    return np.asarray(picks, dtype=np.int64)


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

    def ints(self, values):
        return self.xp.asarray(values, dtype=self.xp.int64, device=self.device)

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


def _projections(run, attention_params, h, names):
    xp = run.xp
    return [split_heads(xp, xp.matmul(h, attention_params[name]), run.config.num_heads) for name in names]


def _finish_layer(run, layer_params, x1, x2, attended):
    """``Y1 = X1 + out(attended)``, ``Y2 = X2 + FeedForward(LayerNorm(Y1))``."""
    xp = run.xp
    y1 = x1 + xp.matmul(merge_heads(xp, attended), layer_params["attention"]["out"])
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
            q, k, v = _projections(run, layer["attention"], h, ("q", "k", "v"))
            attended = local_attention(q, k, v, chunk_length=config.local_chunk_length,
                                       num_chunks_before=config.local_num_chunks_before,
                                       num_chunks_after=config.local_num_chunks_after, **causal)
            cache = {"k": k[:, :, :length, :], "v": v[:, :, :length, :], "start": 0}
            caches.append(run.trim_local(cache, length))
        else:
            qk, v = _projections(run, layer["attention"], h, ("qk", "v"))
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
            q, k, v = _projections(run, layer["attention"], h, ("q", "k", "v"))
            run.write(cache, "k", k, 2, position)
            run.write(cache, "v", v, 2, position)
            attended = _local_step(run, cache, q, position, padded)
            run.trim_local(cache, position + 1)
        else:
            qk, v = _projections(run, layer["attention"], h, ("qk", "v"))
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
    copy = run.ints([w // chunk for w in range(span * chunk)])  # which adjacent chunk a window slot is in
    within = run.ints([w % chunk for w in range(span * chunk)])
    window = ((own - before + before * num_chunks + copy) % num_chunks) * chunk + within  # (W,) positions
    kept = 1 + (num_chunks > 1) * (span - 1)  # copies that count: all, or the first with one chunk
    keep = None if isinstance(kept, int) and kept == span else copy < kept
    start = cache["start"]
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
    slot = run.ints(list(range(rounds))) * padded + rank
    offsets = run.ints([w // chunk - before for w in range(width)]) + before * num_chunks  # >= 0
    within = run.ints([w % chunk for w in range(width)])
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


# ---------------------------------------------------------------- the public function


def check_generate_args(params, config, prompt, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                        rotations_seed, on_token=None):
    """Validate :func:`generate`'s arguments; ``(backend, host prompt, batch, prompt_length)``.

    Shared with the compiled loops (``backends/jax/generate.py``), so they raise the same errors.
    """
    from .._registry import backend_for

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    if not config.causal:
        raise ValueError("generate needs a causal model (config.causal=True): a non-causal model's tokens see "
                         "later positions, which do not exist yet while generating")
    check_params(params, config)
    table = params["embedding"]["tokens"]
    xp = namespace(prompt, table)
    check_same_device({"prompt": prompt, "params": table})
    _check_options(config, temperature, top_k, top_p, eos_token_id, seed, rotations_seed, max_new_tokens)
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be a callable taking the new tokens (a (batch,) int64 NumPy array) or None, "
                        f"got {type(on_token).__name__}")
    backend = backend_for(table)
    host = np.asarray(backend.to_numpy(prompt))
    batch, length = _check_prompt(xp, prompt, config, max_new_tokens, host)
    return backend, host, batch, length


def generate(
    params: dict,
    config: ReformerConfig,
    prompt: Any,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
    rotations_seed: int = 0,
    on_token: Any = None,
):
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens with a per-layer cache.

    The prompt runs once through the model; each new token then runs through the layers
    alone against the cached keys and values (local, full) and keys, values and buckets
    (LSH), so a step costs O(window) (local), O(L) (full) or an O(L log L) sort (LSH) instead
    of a forward over the whole prefix. Greedy tokens equal the argmax of
    :func:`apply` on the prefix padded to a multiple of the chunk lengths (with its padding
    mask), for local and full layers and for an LSH layer whose inputs are exact (the first
    layer, or one above local and full layers only); with LSH layers below other attention
    layers that cannot hold for any cache (see ``docs/numerics.md``, "Cached generation").
    The LSH rotations are fixed for the whole generation: those ``apply`` draws by default
    for ``rotations_seed``; with ``num_buckets=None`` the bucket count (and its rotations) of
    ``prod(axial_pos_shape)`` positions, i.e. :func:`apply` with
    ``config.replace(num_buckets=config.num_buckets_for(config.max_length))``.

    Args:
        params: from :func:`init_params` (any backend); the prompt must be on the same one.
        config: the model's config; it must be causal.
        prompt: int ``(batch, prompt_length)`` or ``(prompt_length,)``, at least one token.
        max_new_tokens: how many tokens to add; ``prompt_length + max_new_tokens`` must not
            exceed ``prod(axial_pos_shape)``.
        temperature: 0 for greedy decoding (``top_k``/``top_p`` are then ignored and no random
            numbers drawn), else the softmax temperature of sampling.
        top_k: sample among the k most probable tokens only (``top_k=1`` is greedy).
        top_p: nucleus sampling: among the smallest set of most probable tokens whose
            probability reaches ``top_p`` (applied after ``top_k``).
        eos_token_id: a sequence that produced it is finished and continues with it; the
            generation stops early once every sequence has finished.
        seed: the sampling seed; the random numbers are drawn on the host by NumPy, so every
            backend given the same seed samples the same tokens (up to ties in rounding).
        rotations_seed: the LSH rotations' seed, as for :func:`apply`.
        on_token: for streaming: a callable called once per step, as soon as the step's
            tokens are chosen (before the next step is computed), with a host int64 NumPy array
            ``(batch,)`` of the new tokens (finished sequences repeat ``eos_token_id``). Its
            return value is ignored; an exception it raises stops the generation and propagates.
            Without it, a backend with a compiled decode loop (``Backend.compiled_generate``:
            JAX, ``reformer_core.backends.jax.generate``) runs the whole generation as one
            compiled call; with it, every backend runs this module's eager loop.

    Returns:
        the prompt followed by the new tokens, on the prompt's backend and in its dtype:
        ``(batch, prompt_length + generated)`` (``(prompt_length + generated,)`` for a 1-D
        prompt), ``generated <= max_new_tokens`` (fewer only when ``eos_token_id`` ended
        every sequence).
    """
    backend, host, batch, length = check_generate_args(params, config, prompt, max_new_tokens, temperature, top_k,
                                                       top_p, eos_token_id, seed, rotations_seed, on_token)
    if max_new_tokens == 0:
        return prompt
    if on_token is None:  # streaming needs the host every step: the eager loop below
        compiled = backend.compiled_generate(params, config, prompt, max_new_tokens, temperature=temperature,
                                             top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, seed=seed,
                                             rotations_seed=rotations_seed)
        if compiled is not None:
            return compiled
    table = params["embedding"]["tokens"]
    xp = namespace(prompt, table)
    host = np.reshape(host, (batch, length)).astype(np.int64)
    params = tree_map(backend.stop_gradient, params)  # no autodiff trace grows with the cache
    run_config = generation_config(config)
    rotations = sample_rotations(run_config, config.max_length, rotations_seed, like=table)
    run = Run(xp, params, run_config, rotations)
    tokens = xp.reshape(prompt, (batch, length))
    logits, caches = prefill(run, tokens, length)
    rng = np.random.default_rng(seed)
    finished = np.zeros(batch, dtype=bool)
    generated = []
    for step in range(max_new_tokens):
        chosen = choose_tokens(np.asarray(backend.to_numpy(logits), dtype=np.float64), rng, temperature=temperature,
                               top_k=top_k, top_p=top_p)
        if eos_token_id is not None:
            chosen = np.where(finished, eos_token_id, chosen)
            finished |= chosen == eos_token_id
        generated.append(chosen)
        if on_token is not None:
            on_token(chosen.copy())
        if step == max_new_tokens - 1 or finished.all():
            break
        token = backend.from_numpy(chosen[:, None].astype(np.int64))
        logits = decode_step(run, caches, token, length + step)
    out = np.concatenate([host, np.stack(generated, axis=1)], axis=1)
    result = xp.astype(backend.from_numpy(out), prompt.dtype)
    return result[0, :] if prompt.ndim == 1 else result


def cached_logits(params: dict, config: ReformerConfig, tokens: Any, prompt_length: int, *, rotations_seed: int = 0):
    """Teacher-forced logits of the cached computation (for tests and measurements).

    The first ``prompt_length`` tokens of ``tokens (batch, length)`` are the prompt; the
    others are fed one at a time through the cache, as :func:`generate` feeds its own.
    Returns host float64 ``(batch, length - prompt_length + 1, vocab)``: row s is what
    :func:`generate` would sample from after ``prompt_length + s`` tokens.
    """
    from .._registry import backend_for

    check_params(params, config)
    table = params["embedding"]["tokens"]
    xp = namespace(tokens, table)
    backend = backend_for(table)
    params = tree_map(backend.stop_gradient, params)
    run_config = generation_config(config)
    run = Run(xp, params, run_config, sample_rotations(run_config, config.max_length, rotations_seed, like=table))
    logits, caches = prefill(run, tokens[:, :prompt_length], prompt_length)
    rows = [np.asarray(backend.to_numpy(logits), dtype=np.float64)]
    for position in range(prompt_length, tokens.shape[1]):
        logits = decode_step(run, caches, tokens[:, position:position + 1], position)
        rows.append(np.asarray(backend.to_numpy(logits), dtype=np.float64))
    return np.stack(rows, axis=1)

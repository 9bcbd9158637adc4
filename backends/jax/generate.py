"""Cached generation on JAX as one compiled call: fixed-size caches and a ``lax.while_loop``.

``reformer_core.generate`` runs its step eagerly, with caches that grow by concatenation: on
JAX every step dispatches hundreds of small operations with new shapes (seconds per token).
Here the prompt's forward, the caches (allocated once, ``padded_length(prompt + new - 1)``
positions long), every step and the sampling are one ``jax.jit`` function; the decode loop is
a ``lax.while_loop`` whose position is a traced integer, so it compiles once per prompt shape,
``max_new_tokens`` and sampling mode, and stops early once ``eos_token_id`` has ended every
sequence.

The step is the core's (``reformer_core/_model/decode.py``: ``prefill``, ``decode_step``): its
position arithmetic runs on traced integers as on ints, and :class:`_FixedRun` gives it the
fixed-size caches: a new position's keys, values and buckets are written in place; unwritten
slots hold zeros (finite, and hidden by the causal mask: they lie after the query) and, for
LSH buckets, a bucket above every real one, which the stable sort puts last and the rank does
not count. The LSH layer's one-chunk case (full attention) is a ``lax.cond``.

Sampling runs in the graph on uniform numbers drawn beforehand on the host exactly as the eager
loop draws them (``numpy.random.default_rng(seed).random(batch)`` per step, none when
greedy), with the core's :func:`~reformer_core._model.sampling.sample_with_uniforms`.
Greedy tokens are exactly the eager loop's (the argmax of the same logits, to rounding);
sampled ones too, except where a logit or the CDF rounds across a boundary: the sampling
arithmetic is float32, float64 with JAX's x64 mode on (the eager loop's is float64 on the host).

Usage::

    from reformer_core.backends.jax.generate import generate

    tokens = generate(params, config, prompt, 256, temperature=0.8, top_k=40, seed=7)

``reformer_core.generate`` on JAX arrays calls this (through ``JaxBackend.compiled_generate``)
unless ``on_token`` is given: streaming needs the host at every step, so it keeps the eager loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import reformer_core._model.decode as decode
from reformer_core._model.generate import check_generate_args
from reformer_core._model.sampling import sample_with_uniforms, sampling_filters
from reformer_core._model.lm import sample_rotations
from reformer_core._registry import backend_for

__all__ = ["generate", "generate_checked"]


class _FixedRun(decode.Run):
    """The core's step context with caches of a fixed length, written in place."""

    def positions(self, position):
        return jnp.reshape(position, (1,))

    def write(self, cache, name, new, axis, position):
        cache[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype), position, axis)

    def trim_local(self, cache, next_position):
        return cache  # a fixed cache keeps every position (the window indexes it by position)

    def branch(self, condition, if_true, if_false):
        return jax.lax.cond(condition, if_true, if_false)


def _fixed_caches(caches, capacity):
    """The prefill's caches (``length`` positions) copied into caches of ``capacity`` positions:
    zeros after them, and for buckets a value above every real bucket."""
    fixed = []
    for cache in caches:
        entry = {}
        for name, value in cache.items():
            if name == "start":
                continue  # always 0 here: nothing is trimmed
            axis = 3 if name == "buckets" else 2  # buckets (b, h, rounds, L); keys, values (b, h, L, d)
            shape = list(value.shape)
            shape[axis] = capacity
            fill = jnp.iinfo(value.dtype).max if name == "buckets" else 0
            entry[name] = jax.lax.dynamic_update_slice_in_dim(jnp.full(shape, fill, value.dtype), value, 0, axis)
        fixed.append(entry)
    return fixed


def _with_start(caches, kinds):
    """The caches as the core's step reads them (local caches name their first position)."""
    return [dict(cache, start=0) if kind == "local" else dict(cache) for cache, kind in zip(caches, kinds)]


def _without_start(caches):
    return [{name: value for name, value in cache.items() if name != "start"} for cache in caches]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy", "use_top_k", "use_top_p",
                                             "use_eos"))
def _decode(params, rotations, tokens, uniforms, temperature, top_k, top_p, eos, *, config, max_new_tokens, greedy,
            use_top_k, use_top_p, use_eos):
    """The prompt's forward and up to ``max_new_tokens`` tokens: ``(tokens (batch,
    max_new_tokens), how many were generated)``; columns from that count on are unused."""
    batch, length = tokens.shape
    kinds = config.attention_layers
    run = _FixedRun(jnp, params, config, rotations)
    logits, caches = decode.prefill(run, tokens, length)
    caches = _fixed_caches(caches, decode.padded_length(config, length + max_new_tokens - 1))

    def choose(logits, u):
        if greedy:
            chosen = jnp.argmax(logits, axis=-1)
        else:
            chosen = sample_with_uniforms(jnp, logits.astype(uniforms.dtype), u, temperature,
                                               top_k if use_top_k else None, top_p if use_top_p else None)
        return chosen.astype(tokens.dtype)

    def finish(chosen, finished):
        if not use_eos:
            return chosen, finished
        chosen = jnp.where(finished, eos, chosen)
        return chosen, finished | (chosen == eos)

    first, finished = finish(choose(logits, uniforms[0]), jnp.zeros((batch,), dtype=bool))
    generated = jnp.zeros((batch, max_new_tokens), tokens.dtype).at[:, 0].set(first)

    def more(state):
        count, _, _, finished, _ = state
        return (count < max_new_tokens) & jnp.logical_not(jnp.all(finished))

    def step(state):
        count, token, caches, finished, generated = state  # token: the last chosen, at position length - 1 + count
        current = _with_start(caches, kinds)
        logits = decode.decode_step(run, current, token[:, None], length - 1 + count)
        chosen, finished = finish(choose(logits, uniforms[count]), finished)
        generated = jax.lax.dynamic_update_slice_in_dim(generated, chosen[:, None], count, 1)
        return count + 1, chosen, _without_start(current), finished, generated

    start = (jnp.asarray(1, dtype=jnp.int32), first, caches, finished, generated)
    count, _, _, _, generated = jax.lax.while_loop(more, step, start)
    return generated, count


def generate_checked(params: dict, config, prompt: Any, max_new_tokens: int, *, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                     seed: int = 0, rotations_seed: int = 0):
    """:func:`generate` for arguments already validated (``reformer_core.generate`` checked
    them), with ``max_new_tokens >= 1``."""
    table = params["embedding"]["tokens"]
    backend = backend_for(table)
    batch, length = (1, prompt.shape[0]) if prompt.ndim == 1 else tuple(prompt.shape)
    run_config = decode.generation_config(config)
    rotations = sample_rotations(run_config, config.max_length, rotations_seed, like=table)
    greedy, top_k, top_p = sampling_filters(config.vocab_size, temperature, top_k, top_p)
    wide = np.float64 if jax.config.jax_enable_x64 else np.float32  # the sampling arithmetic
    # Exactly the eager loop's draws: rng.random((steps, batch)) is rng.random(batch) per step.
    shape = (max_new_tokens, batch)
    uniforms = np.zeros(shape) if greedy else np.random.default_rng(seed).random(shape)

    def scalar(value, dtype):
        return backend.from_numpy(np.asarray(value, dtype=dtype))

    params = jax.tree.map(jax.lax.stop_gradient, params)
    tokens = jnp.reshape(prompt, (batch, length))
    generated, count = _decode(
        params, rotations, tokens.astype(jnp.int32), backend.from_numpy(uniforms.astype(wide)),
        scalar(1.0 if greedy else temperature, wide), scalar(top_k or 0, np.int32), scalar(top_p or 0.0, wide),
        scalar(eos_token_id or 0, np.int32), config=run_config, max_new_tokens=max_new_tokens, greedy=greedy,
        use_top_k=top_k is not None, use_top_p=top_p is not None, use_eos=eos_token_id is not None)
    count = int(count)
    result = jnp.concat([tokens, generated[:, :count].astype(prompt.dtype)], axis=1)
    return result[0, :] if prompt.ndim == 1 else result


def generate(params: dict, config, prompt: Any, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             seed: int = 0, rotations_seed: int = 0):
    """``reformer_core.generate`` (without ``on_token``) for JAX arrays, as one compiled call.

    The same arguments, errors and result as ``reformer_core.generate``: the prompt followed by
    up to ``max_new_tokens`` tokens, as a JAX array in the prompt's dtype. Greedy tokens equal
    the eager loop's; sampled tokens too, up to rounding ties (the sampling arithmetic is
    float32 unless JAX's x64 mode is on). Compiles once per (config, prompt shape,
    ``max_new_tokens``, greedy or sampling, whether top_k/top_p/eos_token_id are used); seeds,
    temperatures, top_k/top_p/eos values and weights of the same shapes reuse the compilation.
    """
    backend, _, _, _ = check_generate_args(params, config, prompt, max_new_tokens, temperature, top_k, top_p,
                                        eos_token_id, seed, rotations_seed)
    if backend.name != "jax":
        raise TypeError(f"reformer_core.backends.jax.generate needs JAX arrays, got {backend.name} arrays; "
                        f"use reformer_core.generate for other backends")
    if max_new_tokens == 0:
        return prompt
    return generate_checked(params, config, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_token_id=eos_token_id, seed=seed, rotations_seed=rotations_seed)

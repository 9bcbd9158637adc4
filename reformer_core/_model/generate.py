"""Cached autoregressive generation: :func:`generate` (validation, the eager loop, and the
dispatch to a backend's compiled loop). The cached model it steps is in ``decode.py``, token
choice in ``sampling.py``; what is exact and what is not is in ``docs/numerics.md``
("Cached generation").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._arrays import check_same_device, namespace
from .._config import ReformerConfig
from .._tree import tree_map
from . import decode  # prefill and decode_step looked up on the module: the eager and compiled loops share them
from .decode import Run, decode_step, generation_config, padded_length, prefill
from .lm import check_params, sample_rotations
from .sampling import choose_tokens, sample_with_uniforms, sampling_filters

__all__ = [
    "generate", "generation_config", "padded_length", "choose_tokens", "cached_logits",
    # the pieces a compiled decode loop reuses (backends/jax/generate.py)
    "check_generate_args", "sampling_filters", "sample_with_uniforms", "Run", "prefill", "decode_step",
]


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
    logits, caches = decode.prefill(run, tokens, length)
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
        logits = decode.decode_step(run, caches, token, length + step)
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
    logits, caches = decode.prefill(run, tokens[:, :prompt_length], prompt_length)
    rows = [np.asarray(backend.to_numpy(logits), dtype=np.float64)]
    for position in range(prompt_length, tokens.shape[1]):
        logits = decode.decode_step(run, caches, tokens[:, position:position + 1], position)
        rows.append(np.asarray(backend.to_numpy(logits), dtype=np.float64))
    return np.stack(rows, axis=1)

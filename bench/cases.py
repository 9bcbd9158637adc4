"""The calls a benchmark row times: attention inputs and functions, and the training step.

:func:`call_for` builds, for one method, pass, length and backend, a zero-argument call with
its inputs already made (Gaussian ``(batch, heads, length, head_dim)`` arrays, rotations drawn
outside): the attention forward, its forward+backward through the backend's ``vjp`` (by the
core's hand-written rules), or a whole training step of a small two-layer model, compiled
where the spec asks for it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reformer_core import (
    Differentiable,
    ReformerConfig,
    default_num_buckets,
    full_attention,
    full_attention_vjp,
    init_params,
    local_attention,
    local_attention_vjp,
    lsh_attention,
    lsh_attention_vjp,
    random_rotations,
    value_and_grad,
)

from .settings import BenchSettings, Method


def attention_functions(method: Method, length: int, settings: BenchSettings, backend: Any):
    """``(forward(qk, v), rule(qk, v))`` with rotations drawn outside, and the bucket count."""
    common = {"causal": settings.causal}
    if method.kind == "native":
        def no_rule(qk, v):
            raise TypeError("native attention is differentiated by the framework's autodiff only")

        return (lambda qk, v: backend.native_full_attention(qk, qk, v, **common), no_rule), None
    if method.kind == "full":
        return (lambda qk, v: full_attention(qk, v, **common),
                lambda qk, v: full_attention_vjp(qk, v, **common)), None
    chunks = {"chunk_length": settings.chunk_length, "num_chunks_before": settings.num_chunks_before,
              "num_chunks_after": settings.num_chunks_after, **common}
    if method.kind == "local":
        return (lambda qk, v: local_attention(qk, qk, v, **chunks),
                lambda qk, v: _local_rule(qk, v, chunks)), None
    num_buckets = default_num_buckets(length, settings.chunk_length)
    rotations = random_rotations((settings.seed, method.num_hashes), settings.heads, settings.head_dim,
                                 method.num_hashes, num_buckets, backend=backend, dtype=settings.dtype)
    kwargs = {**chunks, "num_buckets": num_buckets}
    return (lambda qk, v: lsh_attention(qk, v, rotations, **kwargs),
            lambda qk, v: lsh_attention_vjp(qk, v, rotations, **kwargs)), num_buckets


def _local_rule(qk, v, chunks):
    out, pullback = local_attention_vjp(qk, qk, v, **chunks)

    def pull(d_out):
        d_q, d_k, d_v = pullback(d_out)
        return d_q + d_k, d_v

    return out, pull


def _train_config(settings: BenchSettings, length: int) -> ReformerConfig:
    side = 2 ** math.ceil(math.log2(length) / 2)
    return ReformerConfig(vocab_size=256, d_model=128, num_heads=settings.heads, head_dim=settings.head_dim,
                          d_ff=256, attention_layers=("lsh", "local"), num_hashes=2,
                          lsh_chunk_length=settings.chunk_length, local_chunk_length=settings.chunk_length,
                          ff_chunk_length=1024, causal=settings.causal, axial_pos_shape=(side, side))


def call_for(method: Method, pass_name: str, length: int, settings: BenchSettings, backend: Any, jit: bool = False):
    """``(zero-argument call, num_buckets)`` for one configuration; inputs are made here."""
    rng = np.random.default_rng((settings.seed, length))
    batch = settings.batch_at(length)
    if method.kind == "train":
        config = _train_config(settings, length)
        params = init_params(config, settings.seed, backend=backend, dtype=settings.dtype)
        tokens = backend.from_numpy(rng.integers(0, config.vocab_size, (batch, length)))
        def step(params, tokens):
            return value_and_grad(params, tokens, tokens, config, rotations_seed=1, check_values=False)

        if jit:  # only where jit traces the backend's vjp (runs_on)
            step = backend.jit(step)
        return (lambda: step(params, tokens)), None
    shape = (batch, settings.heads, length, settings.head_dim)
    qk, v, d_out = (backend.from_numpy(rng.standard_normal(shape), dtype=settings.dtype) for _ in range(3))
    (forward, rule), num_buckets = attention_functions(method, length, settings, backend)
    if jit and not backend.jit_traces_vjp:
        forward = backend.jit(forward)  # the framework differentiates the compiled forward
    if pass_name == "forward":
        fn = forward
        args = (qk, v)
    else:
        differentiable = Differentiable(forward, rule, method.name)

        def fn(qk, v, d_out):
            _, pullback = backend.vjp(differentiable, qk, v)
            return pullback(d_out)

        args = (qk, v, d_out)
    if jit and backend.jit_traces_vjp:
        fn = backend.jit(fn)
    return (lambda: fn(*args)), num_buckets

"""Hypothesis strategies for conformance cases, and the cases themselves.

A case is a small frozen dataclass whose ``repr`` is a valid constructor call, so a failure
can print it and anyone can paste it back (see ``reformer_core.conformance.reproduce``).
Every array a case needs is drawn from its ``seed`` with NumPy in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "AttentionCase",
    "LayerCase",
    "ModelCase",
    "attention_cases",
    "layer_cases",
    "model_cases",
    "num_buckets_values",
]


def _keep(batch: int, length: int, real_lengths: Optional[tuple]) -> Optional[np.ndarray]:
    if real_lengths is None:
        return None
    return np.arange(length)[None, :] < np.asarray(real_lengths)[:, None]


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem: shapes, chunking, hashing, masks and a seed."""

    batch: int = 1
    heads: int = 2
    length: int = 16
    head_dim: int = 4
    chunk_length: int = 4
    num_hashes: int = 2
    num_buckets: object = 4
    num_chunks_before: int = 1
    num_chunks_after: int = 0
    causal: bool = True
    real_lengths: Optional[tuple] = None  # per batch row: tokens before the padding
    duplicate_correction: bool = False
    seed: int = 0

    def arrays(self) -> dict:
        """float64 inputs: qk, q, k, v, rotations, the cotangent ``d_out`` and the keep mask."""
        rng = np.random.default_rng(self.seed)
        shape = (self.batch, self.heads, self.length, self.head_dim)
        factors = self.num_buckets if isinstance(self.num_buckets, tuple) else (self.num_buckets,)
        return {
            "qk": rng.standard_normal(shape),
            "q": rng.standard_normal(shape),
            "k": rng.standard_normal(shape),
            "v": rng.standard_normal(shape),
            "rotations": rng.standard_normal((self.heads, self.head_dim, self.num_hashes, sum(factors) // 2)),
            "d_out": rng.standard_normal(shape),
            "keep": _keep(self.batch, self.length, self.real_lengths),
        }

    def lsh_kwargs(self) -> dict:
        return dict(num_buckets=self.num_buckets, chunk_length=self.chunk_length,
                    num_chunks_before=self.num_chunks_before, num_chunks_after=self.num_chunks_after,
                    causal=self.causal, duplicate_correction=self.duplicate_correction)

    def local_kwargs(self) -> dict:
        return dict(chunk_length=self.chunk_length, num_chunks_before=self.num_chunks_before,
                    num_chunks_after=self.num_chunks_after, causal=self.causal)


@dataclass(frozen=True)
class LayerCase:
    """A position-wise layer problem: ``x (batch, length, d_model)`` and a config slice."""

    batch: int = 2
    length: int = 8
    d_model: int = 8
    d_ff: int = 16
    ff_chunk_length: Optional[int] = None
    activation: str = "gelu_tanh"
    vocab_size: int = 11
    axial_shape: tuple = (4, 4)
    seed: int = 0

    def config(self):
        from reformer_core import ReformerConfig

        return ReformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, num_heads=2, head_dim=4,
                              d_ff=self.d_ff, attention_layers=("local",), ff_chunk_length=self.ff_chunk_length,
                              ff_activation=self.activation, axial_pos_shape=self.axial_shape,
                              local_chunk_length=4, layer_norm_eps=1e-6)

    def arrays(self) -> dict:
        rng = np.random.default_rng(self.seed)
        shape = (self.batch, self.length, self.d_model)
        return {"x": rng.standard_normal(shape) * 2, "d_out": rng.standard_normal(shape),
                "tokens": rng.integers(0, self.vocab_size, (self.batch, self.length))}


@dataclass(frozen=True)
class ModelCase:
    """A whole model: a small config, a batch of tokens, masks, dropout and seeds."""

    attention_layers: tuple = ("lsh", "local")
    d_model: int = 8
    num_heads: int = 2
    head_dim: int = 4
    d_ff: int = 12
    num_hashes: int = 2
    num_buckets: object = None
    chunk_length: int = 4
    causal: bool = True
    duplicate_correction: bool = False
    ff_chunk_length: Optional[int] = None
    dropout: float = 0.0
    vocab_size: int = 13
    batch: int = 2
    length: int = 16
    real_lengths: Optional[tuple] = None
    seed: int = 0

    def config(self):
        from reformer_core import ReformerConfig

        return ReformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
            d_ff=self.d_ff, attention_layers=self.attention_layers, num_hashes=self.num_hashes,
            num_buckets=self.num_buckets, lsh_chunk_length=self.chunk_length, local_chunk_length=self.chunk_length,
            causal=self.causal, duplicate_correction=self.duplicate_correction,
            ff_chunk_length=self.ff_chunk_length, ff_activation="gelu_tanh", axial_pos_shape=(4, 8),
            hidden_dropout=self.dropout, attention_dropout=self.dropout, layer_norm_eps=1e-6,
        )

    def arrays(self) -> dict:
        rng = np.random.default_rng(self.seed)
        shape = (self.batch, self.length)
        return {"tokens": rng.integers(0, self.vocab_size, shape), "targets": rng.integers(0, self.vocab_size, shape),
                "keep": _keep(self.batch, self.length, self.real_lengths), "x": rng.standard_normal((*shape, self.d_model))}


# ---------------------------------------------------------------- strategies

num_buckets_values = st.sampled_from([2, 4, 8, (2, 2), (2, 4)])


@st.composite
def _real_lengths(draw, batch: int, length: int):
    if not draw(st.booleans()):
        return None
    return tuple(draw(st.integers(1, length)) for _ in range(batch))


@st.composite
def attention_cases(draw, *, max_length_chunks: int = 4):
    """Valid attention problems: the length is a multiple of the chunk, or at most one chunk."""
    chunk = draw(st.sampled_from([2, 4, 8]))
    multiple = draw(st.integers(1, max_length_chunks))
    length = chunk * multiple if draw(st.integers(0, 4)) else draw(st.integers(1, chunk))
    batch = draw(st.integers(1, 2))
    return AttentionCase(
        batch=batch,
        heads=draw(st.integers(1, 2)),
        length=length,
        head_dim=draw(st.sampled_from([2, 4, 8])),
        chunk_length=chunk,
        num_hashes=draw(st.integers(1, 3)),
        num_buckets=draw(num_buckets_values),
        num_chunks_before=draw(st.integers(0, 2)),
        num_chunks_after=draw(st.integers(0, 1)),
        causal=draw(st.booleans()),
        real_lengths=draw(_real_lengths(batch, length)),
        duplicate_correction=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def layer_cases(draw):
    length = draw(st.integers(1, 16))
    return LayerCase(
        batch=draw(st.integers(1, 2)),
        length=length,
        d_model=draw(st.sampled_from([4, 8])),
        d_ff=draw(st.sampled_from([4, 16])),
        ff_chunk_length=draw(st.one_of(st.none(), st.integers(1, 8))),
        activation=draw(st.sampled_from(["relu", "gelu_tanh", "silu"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def model_cases(draw):
    chunk = draw(st.sampled_from([4, 8]))
    length = chunk * draw(st.integers(1, 4))
    batch = draw(st.integers(1, 2))
    layers = tuple(draw(st.lists(st.sampled_from(["lsh", "local", "full"]), min_size=1, max_size=3)))
    return ModelCase(
        attention_layers=layers,
        num_hashes=draw(st.integers(1, 3)),
        num_buckets=draw(st.one_of(st.none(), num_buckets_values)),
        chunk_length=chunk,
        causal=draw(st.booleans()),
        duplicate_correction=draw(st.booleans()),
        ff_chunk_length=draw(st.one_of(st.none(), st.integers(1, 8))),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.2])),
        batch=batch,
        length=length,
        real_lengths=draw(_real_lengths(batch, length)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


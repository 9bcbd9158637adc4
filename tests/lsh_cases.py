"""One drawn LSH attention case for the fast-path tests of every framework: inputs, explicit
rotations, keyword arguments and a cotangent, made in NumPy and converted by the caller."""

from __future__ import annotations

import numpy as np

import reformer_core as rc


def lsh_case(seed, batch, heads, chunks, chunk, head_dim, num_hashes, before, after, causal, padded, dropout,
             duplicate_correction, *, floats, bools):
    """``(qk, v, rotations, kwargs, cotangent)``; ``floats``/``bools`` turn NumPy arrays into the
    framework's floating (in the tested dtype) and bool arrays."""
    rng = np.random.default_rng(seed)
    length = chunks * chunk
    qk = floats(rng.standard_normal((batch, heads, length, head_dim)))
    v = floats(rng.standard_normal((batch, heads, length, head_dim)))
    num_buckets = rc.default_num_buckets(length, chunk)
    rotations = rc.random_rotations(seed, heads, head_dim, num_hashes, num_buckets, like=qk)
    kwargs = dict(num_buckets=num_buckets, chunk_length=chunk, num_chunks_before=before, num_chunks_after=after,
                  causal=causal, duplicate_correction=duplicate_correction)
    if padded:
        lengths = rng.integers(1, length + 1, batch)
        kwargs["attention_mask"] = bools(np.arange(length)[None, :] < lengths[:, None])
    if dropout:
        window = (before + 1 + after) * chunk
        shape = (batch, heads, num_hashes * length // chunk, chunk, window)
        kwargs.update(dropout_rate=dropout, dropout_keep=bools(rng.random(shape) >= dropout))
    return qk, v, rotations, kwargs, floats(rng.standard_normal((batch, heads, length, head_dim)))

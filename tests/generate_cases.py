"""The small models of the generation tests (tests/test_generate.py, tests/test_jax_generate.py):
one config maker and the attention stacks cached generation must reproduce exactly."""

from __future__ import annotations

import reformer_core as rc

VOCAB = 24


def make_config(**changes) -> rc.ReformerConfig:
    base = dict(vocab_size=VOCAB, d_model=12, num_heads=2, head_dim=6, d_ff=16, attention_layers=("lsh",),
                num_hashes=2, num_buckets=4, lsh_chunk_length=4, local_chunk_length=4, axial_pos_shape=(4, 8),
                initializer_range=0.5)  # large weights: logits far apart, tokens varied
    base.update(changes)
    return rc.ReformerConfig(**base)


STACKS = {
    "local": dict(attention_layers=("local",)),
    "local-local": dict(attention_layers=("local", "local")),
    "local-wraps": dict(attention_layers=("local",), local_num_chunks_before=2, local_num_chunks_after=1),
    "full": dict(attention_layers=("full", "full")),
    "lsh": dict(attention_layers=("lsh",)),
    "lsh-3-rounds-2-back": dict(attention_layers=("lsh",), num_hashes=3, lsh_num_chunks_before=2),
    "lsh-look-ahead": dict(attention_layers=("lsh",), lsh_num_chunks_after=1),
    "lsh-duplicate-correction": dict(attention_layers=("lsh",), num_hashes=3, duplicate_correction=True),
    "lsh-factorised-default-buckets": dict(attention_layers=("lsh",), num_buckets=None, axial_pos_shape=(8, 8)),
    "local-then-lsh": dict(attention_layers=("local", "lsh")),
    "local-full-lsh": dict(attention_layers=("local", "full", "lsh")),
    "local-8-then-lsh-4": dict(attention_layers=("local", "lsh"), local_chunk_length=8),
}

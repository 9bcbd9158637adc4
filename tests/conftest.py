"""Shared fixtures for the unit tests.

Keep this file small: fixtures here are used by several test modules.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

# CI must not flake: hypothesis draws the same examples every run unless HYPOTHESIS_RANDOM=1
# asks for fresh ones (a soak; failures print their seed and the falsifying example).
settings.register_profile("reformer-core-tests", derandomize=not os.environ.get("HYPOTHESIS_RANDOM"))
settings.load_profile("reformer-core-tests")

import reformer_core as rc


@pytest.fixture
def rng() -> np.random.Generator:
    """A NumPy generator with a fixed seed, fresh for every test."""
    return np.random.default_rng(20200113)


@pytest.fixture
def tiny_config() -> rc.ReformerConfig:
    """A two-layer (LSH, local) model small enough to run in milliseconds.

    Sequences must be multiples of 4 (both chunk lengths) and at most 16 long
    (``prod(axial_pos_shape)``).
    """
    return rc.ReformerConfig(
        vocab_size=16,
        d_model=8,
        num_heads=2,
        head_dim=4,
        d_ff=16,
        attention_layers=("lsh", "local"),
        num_hashes=2,
        num_buckets=4,
        lsh_chunk_length=4,
        local_chunk_length=4,
        axial_pos_shape=(4, 4),
    )


@pytest.fixture
def restore_backend(monkeypatch):
    """No ``set_backend`` default before and after the test, and ``$REFORMER_BACKEND`` hidden."""
    monkeypatch.delenv("REFORMER_BACKEND", raising=False)
    rc.set_backend(None)
    yield
    rc.set_backend(None)

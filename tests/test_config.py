"""ReformerConfig: frozen, validated, never mutated; default bucket counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings, strategies as st

import reformer_core as rc
from reformer_core._config import rotation_size, total_buckets


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ---------------------------------------------------------------- frozen, never mutated


def test_config_is_frozen(tiny_config):
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config.num_buckets = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config.d_model = 16


def test_config_is_hashable_and_compares_by_value(tiny_config):
    same = rc.ReformerConfig.from_dict(tiny_config.to_dict())
    assert same == tiny_config
    assert hash(same) == hash(tiny_config)


def test_num_buckets_for_does_not_mutate(tiny_config):
    config = tiny_config.replace(num_buckets=None, lsh_chunk_length=64, local_chunk_length=64,
                                 axial_pos_shape=(256, 256))
    before = config.to_dict()
    assert config.num_buckets_for(1024) == rc.default_num_buckets(1024, 64) == 32
    assert config.num_buckets_for(65536) == rc.default_num_buckets(65536, 64)
    assert config.num_buckets is None
    assert config.to_dict() == before


def test_num_buckets_for_returns_the_fixed_value(tiny_config):
    assert tiny_config.num_buckets == 4
    assert tiny_config.num_buckets_for(8) == 4
    assert tiny_config.num_buckets_for(4096) == 4
    factored = tiny_config.replace(num_buckets=(2, 4))
    assert factored.num_buckets_for(4096) == (2, 4)


@pytest.mark.parametrize("length", [1, 4, 64, 128, 1000, 4096, 65536])
def test_num_buckets_for_follows_default(tiny_config, length):
    config = tiny_config.replace(num_buckets=None, lsh_chunk_length=32)
    assert config.num_buckets_for(length) == rc.default_num_buckets(length, 32)


# ---------------------------------------------------------------- default_num_buckets


@pytest.mark.parametrize(
    "length, chunk_length, expected",
    [
        (1024, 64, 32),  # 2 * 1024 / 64
        (4096, 64, 128),
        (2048, 32, (8, 16)),  # 128 > 2 * max(sqrt(64), 32) = 64: factorised
        (1000, 64, 16),  # 2 * (1000 // 64) = 30 -> the power of two below
        (64, 64, 2),
        (10, 64, 2),  # shorter than one chunk: the minimum
        (1, 1, 2),
        (65536, 64, (32, 64)),  # 2048 buckets > 2 * max(sqrt(1024), 64): factorised
    ],
)
def test_default_num_buckets_examples(length, chunk_length, expected):
    assert rc.default_num_buckets(length, chunk_length) == expected


def test_default_num_buckets_large_is_factorised():
    buckets = rc.default_num_buckets(65536, 64)
    assert isinstance(buckets, tuple) and len(buckets) == 2
    assert all(is_power_of_two(b) and b >= 2 for b in buckets)
    assert math.prod(buckets) == 2 * 65536 // 64
    assert rotation_size(buckets) == sum(buckets) < total_buckets(buckets)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 2**24), chunk_length=st.integers(1, 4096))
def test_default_num_buckets_property(length, chunk_length):
    buckets = rc.default_num_buckets(length, chunk_length)
    factors = buckets if isinstance(buckets, tuple) else (buckets,)
    assert len(factors) in (1, 2)
    assert all(isinstance(f, int) and f >= 2 and is_power_of_two(f) for f in factors)
    total = total_buckets(buckets)
    assert is_power_of_two(total) and total >= 2
    # near 2 * L / chunk: the largest power of two not above it (2 when that is below 2)
    target = 2 * (length // chunk_length)
    assert total == 2 or total <= target < 2 * total
    # valid as a config value and for hashing
    rc.ReformerConfig(vocab_size=2, num_buckets=buckets)


# ---------------------------------------------------------------- serialisation and replace


@pytest.mark.parametrize("num_buckets", [None, 8, (2, 4)])
def test_to_dict_from_dict_round_trip(tiny_config, num_buckets):
    config = tiny_config.replace(num_buckets=num_buckets, axial_pos_dims=(3, 5), ff_chunk_length=2)
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(rc.ReformerConfig)}
    assert data["attention_layers"] == ["lsh", "local"]  # JSON-friendly
    again = rc.ReformerConfig.from_dict(data)
    assert again == config
    assert again.num_buckets == num_buckets
    assert again.axial_pos_dims == (3, 5)


def test_to_dict_is_json_serialisable(tiny_config):
    import json

    data = tiny_config.replace(num_buckets=(2, 2)).to_dict()
    assert rc.ReformerConfig.from_dict(json.loads(json.dumps(data))) == tiny_config.replace(num_buckets=(2, 2))


def test_replace_returns_a_new_config(tiny_config):
    changed = tiny_config.replace(num_hashes=4)
    assert changed.num_hashes == 4
    assert tiny_config.num_hashes == 2
    assert changed is not tiny_config


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"num_buckets": 3}, ValueError, r"num_buckets factors must be even"),
        ({"d_model": 10, "axial_pos_dims": (4, 4)}, ValueError, r"must sum to d_model=10"),
        ({"attention_layers": ("lsh", "dense")}, ValueError, r"unknown kind 'dense'"),
        ({"num_heads": 2.0}, TypeError, r"num_heads must be an int"),
    ],
)
def test_replace_revalidates(tiny_config, changes, error, message):
    with pytest.raises(error, match=message):
        tiny_config.replace(**changes)


def test_replace_unknown_field(tiny_config):
    with pytest.raises(TypeError, match="num_layers"):
        tiny_config.replace(num_layers=3)


# ---------------------------------------------------------------- validate_length


def test_validate_length_accepts(tiny_config):
    for length in (1, 3, 4, 8, 16):  # up to one chunk anything goes; beyond, multiples of 4
        tiny_config.validate_length(length)


@pytest.mark.parametrize(
    "length, error, message",
    [
        (0, ValueError, r"sequence length must be >= 1, got 0"),
        (8.0, TypeError, r"sequence length must be an int"),
        (32, ValueError, r"sequence length 32 exceeds .* capacity prod\(axial_pos_shape\)=16"),
        (6, ValueError, r"sequence length 6 is not a multiple of lsh_chunk_length=4; pad it"),
    ],
)
def test_validate_length_errors(tiny_config, length, error, message):
    with pytest.raises(error, match=message):
        tiny_config.validate_length(length)


def test_validate_length_checks_local_chunks(tiny_config):
    config = tiny_config.replace(attention_layers=("local",), local_chunk_length=8)
    config.validate_length(6)  # one local chunk; no LSH layer
    with pytest.raises(ValueError, match=r"not a multiple of local_chunk_length=8.*pad_to_multiple"):
        config.validate_length(12)


def test_validate_length_ignores_chunks_of_absent_kinds(tiny_config):
    config = tiny_config.replace(attention_layers=("full",))
    config.validate_length(7)


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize(
    "d_model, axial_pos_shape, expected",
    [
        (256, (64, 64), (128, 128)),
        (8, (4, 4), (4, 4)),
        (10, (2, 2, 2), (4, 3, 3)),  # the remainder goes to the first axes
        (7, (16,), (7,)),
    ],
)
def test_axial_dims_default_splits_d_model(tiny_config, d_model, axial_pos_shape, expected):
    config = tiny_config.replace(d_model=d_model, axial_pos_shape=axial_pos_shape)
    assert config.axial_pos_dims is None
    assert config.axial_dims == expected
    assert sum(config.axial_dims) == d_model


def test_axial_dims_explicit(tiny_config):
    assert tiny_config.replace(axial_pos_dims=(2, 6)).axial_dims == (2, 6)


def test_num_layers_and_max_length(tiny_config):
    assert tiny_config.num_layers == 2
    assert tiny_config.max_length == 16


def test_defaults_are_valid():
    config = rc.ReformerConfig(vocab_size=320)
    assert config.num_buckets is None
    assert config.axial_dims == (128, 128)
    assert config.max_length == 4096
    assert config.num_buckets_for(4096) == 128

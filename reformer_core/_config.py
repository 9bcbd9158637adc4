"""The model configuration: frozen, validated on construction, never mutated."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Union

__all__ = ["ReformerConfig", "default_num_buckets", "validate_num_buckets", "ATTENTION_KINDS", "ACTIVATIONS"]

ATTENTION_KINDS = ("lsh", "local", "full")
ACTIVATIONS = ("relu", "gelu_tanh", "silu")

NumBuckets = Union[int, tuple[int, ...], None]


def _positive_int(name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def validate_num_buckets(num_buckets, name: str = "num_buckets") -> None:
    """An even int >= 2, or a non-empty tuple of even ints >= 2 (factorised hashing)."""
    if isinstance(num_buckets, (tuple, list)):
        if isinstance(num_buckets, list):
            raise TypeError(f"{name} must be an int or a tuple of ints, got a list; use tuple({num_buckets!r})")
        if not num_buckets:
            raise ValueError(f"{name} must not be an empty tuple; give an even int such as 32")
        factors = num_buckets
    else:
        factors = (num_buckets,)
    for factor in factors:
        if isinstance(factor, bool) or not isinstance(factor, int):
            raise TypeError(f"{name} must hold ints, got {factor!r}")
        if factor < 2 or factor % 2:
            raise ValueError(
                f"{name} factors must be even and >= 2 (each factor hashes with [xR, -xR]), "
                f"got {num_buckets!r}; use e.g. {factor + factor % 2 if factor >= 2 else 2}"
            )


def total_buckets(num_buckets: int | tuple[int, ...]) -> int:
    """Number of buckets: the int itself, or the product of the factors."""
    if isinstance(num_buckets, tuple):
        return math.prod(num_buckets)
    return num_buckets


def rotation_size(num_buckets: int | tuple[int, ...]) -> int:
    """Columns of ``[xR, -xR]``: the int itself, or the sum of the factors."""
    if isinstance(num_buckets, tuple):
        return sum(num_buckets)
    return num_buckets


def default_num_buckets(length: int, chunk_length: int) -> int | tuple[int, int]:
    """The bucket count the paper recommends for a sequence: chunk ~ 2 * L / n_buckets.

    A power of two near ``2 * length / chunk_length`` (at least 2). When that exceeds
    ``2 * max(sqrt(length / chunk_length), chunk_length)`` it is factorised into two powers
    of two, so the rotation matrices stay small (as in trax and HF transformers).
    """
    _positive_int("length", length)
    _positive_int("chunk_length", chunk_length)
    power = max(1, (2 * (length // chunk_length)).bit_length() - 1)
    limit = 2 * max(math.isqrt(length // chunk_length), chunk_length)
    if 2**power > limit:
        return (2 ** (power // 2), 2 ** (power - power // 2))
    return 2**power


@dataclass(frozen=True)
class ReformerConfig:
    """Hyper-parameters of a Reformer language model.

    Every field is checked on construction; an invalid value raises ``ValueError`` (or
    ``TypeError``) that names the field and how to fix it. The config is never mutated:
    length-dependent choices (``num_buckets=None``) are made per call by
    :meth:`num_buckets_for`.

    Attributes:
        vocab_size: number of token ids.
        d_model: width of each half of the reversible stream.
        num_heads, head_dim: attention heads and their width.
        d_ff: hidden width of the feed-forward block.
        attention_layers: one entry per layer, each ``"lsh"``, ``"local"`` or ``"full"``;
            the number of layers is its length.
        num_hashes: LSH hashing rounds.
        num_buckets: an even int, a tuple of even factors, or None for
            :func:`default_num_buckets` of the sequence length.
        lsh_chunk_length, lsh_num_chunks_before, lsh_num_chunks_after: LSH chunking.
        local_chunk_length, local_num_chunks_before, local_num_chunks_after: local chunking.
        causal: mask keys after the query (by original position).
        duplicate_correction: subtract ``log N_ij`` for keys seen in several rounds.
        ff_chunk_length: compute the feed-forward this many positions at a time (None: all).
        ff_activation: ``"relu"``, ``"gelu_tanh"`` or ``"silu"``.
        axial_pos_shape: axial positional shape; its product bounds the sequence length.
        axial_pos_dims: widths per axis, summing to ``d_model`` (None: split evenly).
        hidden_dropout, attention_dropout: dropout rates in [0, 1).
        layer_norm_eps: epsilon of every layer norm.
        initializer_range: standard deviation of the normal initialisation.
        hash_seed: None (default): LSH rotations come from reformer-core's explicit seeds
            (``rotations_seed``). An int: every LSH layer, at every call, hashes with the
            rotations HF transformers draws for ``hash_seed`` (``torch.manual_seed(hash_seed)``
            then ``torch.randn``, on the CPU, in the activations' dtype); ``rotations_seed`` is
            then ignored. Needs torch; see ``docs/hf.md``.
    """

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    head_dim: int = 64
    d_ff: int = 512
    attention_layers: tuple[str, ...] = ("lsh", "lsh")
    num_hashes: int = 2
    num_buckets: NumBuckets = None
    lsh_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    local_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    causal: bool = True
    duplicate_correction: bool = False
    ff_chunk_length: int | None = None
    ff_activation: str = "relu"
    axial_pos_shape: tuple[int, ...] = (64, 64)
    axial_pos_dims: tuple[int, ...] | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    hash_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_hashes",
                     "lsh_chunk_length", "local_chunk_length"):
            _positive_int(name, getattr(self, name))
        for name in ("lsh_num_chunks_before", "lsh_num_chunks_after",
                     "local_num_chunks_before", "local_num_chunks_after"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        if self.ff_chunk_length is not None:
            _positive_int("ff_chunk_length", self.ff_chunk_length)
        if isinstance(self.attention_layers, (str, list)) or not isinstance(self.attention_layers, tuple):
            raise TypeError(
                f"attention_layers must be a tuple of kinds, one per layer, e.g. ('lsh', 'local'); "
                f"got {self.attention_layers!r}"
            )
        if not self.attention_layers:
            raise ValueError("attention_layers must name at least one layer, e.g. ('lsh',)")
        for kind in self.attention_layers:
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"attention_layers holds unknown kind {kind!r}; use one of {ATTENTION_KINDS}")
        if self.num_buckets is not None:
            validate_num_buckets(self.num_buckets)
        if self.ff_activation not in ACTIVATIONS:
            raise ValueError(f"ff_activation {self.ff_activation!r} is unknown; use one of {ACTIVATIONS}")
        for name in ("causal", "duplicate_correction"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._validate_axial()
        for name in ("hidden_dropout", "attention_dropout"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {rate!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive float, got {value!r}")
        if self.hash_seed is not None:
            if isinstance(self.hash_seed, bool) or not isinstance(self.hash_seed, int):
                raise TypeError(f"hash_seed must be an int or None, got {type(self.hash_seed).__name__} "
                                f"({self.hash_seed!r})")
            if not -(2**63) <= self.hash_seed < 2**64:  # the range torch.manual_seed accepts
                raise ValueError(f"hash_seed must lie in [-2**63, 2**64) (torch.manual_seed's range), "
                                 f"got {self.hash_seed}")

    def _validate_axial(self) -> None:
        if not isinstance(self.axial_pos_shape, tuple) or not self.axial_pos_shape:
            raise TypeError(f"axial_pos_shape must be a non-empty tuple of ints, got {self.axial_pos_shape!r}")
        for size in self.axial_pos_shape:
            _positive_int("axial_pos_shape entries", size)
        if self.axial_pos_dims is None:
            if self.d_model < len(self.axial_pos_shape):
                raise ValueError(
                    f"d_model={self.d_model} cannot be split over {len(self.axial_pos_shape)} axial axes; "
                    f"use fewer axial_pos_shape entries"
                )
            return
        if not isinstance(self.axial_pos_dims, tuple):
            raise TypeError(f"axial_pos_dims must be a tuple of ints or None, got {self.axial_pos_dims!r}")
        if len(self.axial_pos_dims) != len(self.axial_pos_shape):
            raise ValueError(
                f"axial_pos_dims {self.axial_pos_dims} needs one width per axial_pos_shape axis "
                f"{self.axial_pos_shape}"
            )
        for width in self.axial_pos_dims:
            _positive_int("axial_pos_dims entries", width)
        if sum(self.axial_pos_dims) != self.d_model:
            raise ValueError(
                f"axial_pos_dims {self.axial_pos_dims} must sum to d_model={self.d_model} "
                f"(they are concatenated); got sum {sum(self.axial_pos_dims)}"
            )

    # ---- derived values (pure functions of the fields) ----

    @property
    def num_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def axial_dims(self) -> tuple[int, ...]:
        """Widths of the axial positional embeddings (``axial_pos_dims`` or an even split)."""
        if self.axial_pos_dims is not None:
            return self.axial_pos_dims
        n = len(self.axial_pos_shape)
        base, extra = divmod(self.d_model, n)
        return tuple(base + (1 if i < extra else 0) for i in range(n))

    @property
    def max_length(self) -> int:
        """Longest sequence the axial positional embedding covers."""
        return math.prod(self.axial_pos_shape)

    def num_buckets_for(self, length: int) -> int | tuple[int, ...]:
        """``num_buckets``, or the default for a sequence of ``length`` when it is None."""
        if self.num_buckets is not None:
            return self.num_buckets
        return default_num_buckets(length, self.lsh_chunk_length)

    def validate_length(self, length: int) -> None:
        """Raise ValueError when a sequence of ``length`` cannot run with this config."""
        _positive_int("sequence length", length)
        if length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds the axial positional embedding's capacity "
                f"prod(axial_pos_shape)={self.max_length}; enlarge axial_pos_shape"
            )
        kinds = set(self.attention_layers)
        if "lsh" in kinds and length > self.lsh_chunk_length and length % self.lsh_chunk_length:
            raise ValueError(
                f"sequence length {length} is not a multiple of lsh_chunk_length={self.lsh_chunk_length}; "
                f"pad it (reformer_core.pad_to_multiple) or change lsh_chunk_length"
            )
        if "local" in kinds and length > self.local_chunk_length and length % self.local_chunk_length:
            raise ValueError(
                f"sequence length {length} is not a multiple of local_chunk_length={self.local_chunk_length}; "
                f"pad it (reformer_core.pad_to_multiple) or change local_chunk_length"
            )

    def replace(self, **changes) -> "ReformerConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ReformerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ReformerConfig fields {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


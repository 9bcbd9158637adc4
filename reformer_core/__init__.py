"""reformer-core: the Reformer, written once against the Python Array API.

The public API is re-exported here explicitly; everything else is private.
"""

from .backend import available_backends, backend_for, get_backend, known_backends, set_backend, use_backend
from .chunking import look_adjacent, pad_to_multiple
from .config import ReformerConfig, default_num_buckets
from .full import full_attention
from .hashing import hash_vectors, random_rotations
from .local import local_attention
from .lsh import combine_rounds, lsh_attention
from .sorting import sort_by_bucket

__version__ = "0.1.0"

__all__ = [
    "ReformerConfig",
    "available_backends",
    "backend_for",
    "combine_rounds",
    "default_num_buckets",
    "full_attention",
    "get_backend",
    "hash_vectors",
    "known_backends",
    "local_attention",
    "look_adjacent",
    "lsh_attention",
    "pad_to_multiple",
    "random_rotations",
    "set_backend",
    "sort_by_bucket",
    "use_backend",
]

"""reformer-core: the Reformer, written once against the Python Array API.

The public API is re-exported here explicitly; everything else is private.
"""

from .backend import available_backends, backend_for, get_backend, known_backends, set_backend, use_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .chunking import pad_to_multiple
from .config import ReformerConfig, default_num_buckets
from .full import full_attention
from .hashing import hash_vectors, random_rotations
from .local import local_attention
from .lsh import lsh_attention
from .model import apply, cross_entropy_loss, init_params, param_shapes, sample_rotations
from .reversible import reversible_forward, reversible_inverse

__version__ = "0.1.0"

__all__ = [
    "ReformerConfig",
    "apply",
    "available_backends",
    "backend_for",
    "cross_entropy_loss",
    "default_num_buckets",
    "full_attention",
    "get_backend",
    "hash_vectors",
    "init_params",
    "known_backends",
    "load_checkpoint",
    "local_attention",
    "lsh_attention",
    "pad_to_multiple",
    "param_shapes",
    "random_rotations",
    "reversible_forward",
    "reversible_inverse",
    "sample_rotations",
    "save_checkpoint",
    "set_backend",
    "use_backend",
]

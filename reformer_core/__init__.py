"""reformer-core: the Reformer, written once against the Python Array API.

This file is the whole public API: explicit re-exports, nothing else. Modules and packages
with a leading underscore are private. Framework-native pieces live with their backend
(``reformer_core.backends.torch.ReformerLM``, ``reformer_core.backends.jax.model``); the
conformance suite is ``reformer_core.conformance``, the benchmarks ``reformer_core.bench``.
"""

from ._attention.chunking import pad_to_multiple
from ._attention.dispatch import standard_path, uses_standard_path
from ._attention.full import full_attention, full_attention_vjp
from ._attention.hashing import hash_vectors, random_rotations
from ._attention.local import local_attention, local_attention_vjp
from ._attention.lsh import lsh_attention, lsh_attention_vjp
from ._config import ReformerConfig, default_num_buckets
from ._io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ._io.hf import from_pretrained, save_pretrained
from ._model.autodiff import Differentiable
from ._model.generate import generate
from ._model.lm import apply, cross_entropy_loss, init_params, param_shapes, sample_dropout_masks, sample_rotations
from ._model.optim import Adam, warmup_inverse_sqrt
from ._model.reversible import (
    ReversibleLayer,
    reversible_backward,
    reversible_forward,
    reversible_inverse,
    stored_backward,
)
from ._model.training import value_and_grad
from ._registry import available_backends, backend_for, get_backend, known_backends, set_backend, use_backend
from ._tree import tree_leaves, tree_map, tree_map_with_path, tree_paths

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "Checkpoint",
    "Differentiable",
    "ReformerConfig",
    "ReversibleLayer",
    "apply",
    "available_backends",
    "backend_for",
    "cross_entropy_loss",
    "default_num_buckets",
    "from_pretrained",
    "full_attention",
    "full_attention_vjp",
    "generate",
    "get_backend",
    "hash_vectors",
    "init_params",
    "known_backends",
    "load_checkpoint",
    "local_attention",
    "local_attention_vjp",
    "lsh_attention",
    "lsh_attention_vjp",
    "pad_to_multiple",
    "param_shapes",
    "random_rotations",
    "reversible_backward",
    "reversible_forward",
    "reversible_inverse",
    "sample_dropout_masks",
    "sample_rotations",
    "save_checkpoint",
    "save_pretrained",
    "set_backend",
    "standard_path",
    "stored_backward",
    "tree_leaves",
    "tree_map",
    "tree_map_with_path",
    "tree_paths",
    "use_backend",
    "uses_standard_path",
    "value_and_grad",
    "warmup_inverse_sqrt",
]

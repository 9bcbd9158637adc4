"""Minimal pytree helpers for parameters: nested dicts and lists of arrays.

Only dicts and lists are containers; anything else (tuples included) is a leaf.

JAX users can use ``jax.tree_util`` on the same structures; these helpers exist so the
core needs no framework.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

__all__ = ["tree_map", "tree_leaves", "tree_paths", "tree_map_with_path"]


def tree_map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any, path: str = "") -> Any:
    """Apply ``fn(path, leaf, *other_leaves)`` to every leaf; paths look like ``layers/0/attention/qk``."""
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or set(other) != set(tree):
                raise ValueError(f"trees differ at {path or '<root>'}: keys {sorted(tree)} vs {_describe(other)}")
        return {k: tree_map_with_path(fn, tree[k], *(o[k] for o in rest), path=_join(path, k)) for k in tree}
    if isinstance(tree, list):
        for other in rest:
            if not isinstance(other, list) or len(other) != len(tree):
                raise ValueError(f"trees differ at {path or '<root>'}: {len(tree)} entries vs {_describe(other)}")
        return [tree_map_with_path(fn, t, *(o[i] for o in rest), path=_join(path, str(i))) for i, t in enumerate(tree)]
    return fn(path, tree, *rest)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn(leaf, *other_leaves)`` to every leaf of ``tree`` (and matching trees)."""
    return tree_map_with_path(lambda _path, *leaves: fn(*leaves), tree, *rest)


def tree_paths(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs in a fixed order (dict keys sorted)."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from tree_paths(tree[k], _join(path, k))
    elif isinstance(tree, list):
        for i, t in enumerate(tree):
            yield from tree_paths(t, _join(path, str(i)))
    else:
        yield path, tree


def tree_leaves(tree: Any) -> list:
    return [leaf for _, leaf in tree_paths(tree)]


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def _describe(other: Any) -> str:
    if isinstance(other, dict):
        return f"keys {sorted(other)}"
    if isinstance(other, list):
        return f"{len(other)} entries"
    return type(other).__name__

"""Pytrees: nested dicts, lists and tuples of arrays (parameters, gradients, optimizer state).

One convention everywhere, the one JAX uses: dicts, lists and tuples are containers, ``None``
is an empty subtree (it has no leaves and maps to ``None``), anything else is a leaf. Dict
entries are visited in sorted key order, so the leaves of two dicts with the same keys line
up whatever order the keys were inserted in. ``is_leaf`` stops the descent early, e.g.
:func:`is_shape` for the shape trees of ``param_shapes``, whose leaves are tuples.

JAX users can use ``jax.tree_util`` on the same structures; these helpers exist so the core
and the backends need no framework to walk them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

__all__ = ["tree_map", "tree_map_with_path", "tree_paths", "tree_leaves", "tree_unflatten", "tree_add", "is_shape"]

Leaf = Callable[[Any], bool]


def is_shape(node: Any) -> bool:
    """A tuple of ints (a shape), which :func:`tree_map` should treat as one leaf."""
    return isinstance(node, tuple) and all(isinstance(size, int) for size in node)


def _is_container(node: Any, is_leaf: Leaf | None) -> bool:
    if is_leaf is not None and is_leaf(node):
        return False
    return node is None or isinstance(node, (dict, list, tuple))


def tree_map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any, is_leaf: Leaf | None = None,
                       path: str = "") -> Any:
    """Apply ``fn(path, leaf, *other_leaves)`` to every leaf; paths look like ``layers/0/attention/qk``.

    ``rest`` are trees of the same structure (ValueError naming the first difference if not).
    Leaves are visited in the tree's own order (dict insertion order).
    """
    if not _is_container(tree, is_leaf):
        return fn(path, tree, *rest)
    for other in rest:
        _check_same_node(tree, other, path)
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: tree_map_with_path(fn, tree[k], *(o[k] for o in rest), is_leaf=is_leaf, path=_join(path, k))
                for k in tree}
    children = [tree_map_with_path(fn, t, *(o[i] for o in rest), is_leaf=is_leaf, path=_join(path, str(i)))
                for i, t in enumerate(tree)]
    return children if isinstance(tree, list) else tuple(children)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any, is_leaf: Leaf | None = None) -> Any:
    """Apply ``fn(leaf, *other_leaves)`` to every leaf of ``tree`` (and matching trees)."""
    return tree_map_with_path(lambda _path, *leaves: fn(*leaves), tree, *rest, is_leaf=is_leaf)


def tree_paths(tree: Any, *, is_leaf: Leaf | None = None, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs in a fixed order (dict keys sorted)."""
    if not _is_container(tree, is_leaf):
        yield path, tree
    elif isinstance(tree, dict):
        for k in sorted(tree):
            yield from tree_paths(tree[k], is_leaf=is_leaf, path=_join(path, k))
    elif tree is not None:
        for i, t in enumerate(tree):
            yield from tree_paths(t, is_leaf=is_leaf, path=_join(path, str(i)))


def tree_leaves(tree: Any, *, is_leaf: Leaf | None = None) -> list:
    """The leaves in :func:`tree_paths` order."""
    return [leaf for _, leaf in tree_paths(tree, is_leaf=is_leaf)]


def tree_unflatten(template: Any, leaves: Iterable[Any], *, is_leaf: Leaf | None = None) -> Any:
    """Inverse of :func:`tree_leaves`: a tree shaped like ``template`` holding ``leaves``
    (taken in :func:`tree_paths` order; dicts come back with sorted keys)."""
    source = iter(leaves)
    rebuilt = _unflatten(template, source, is_leaf)
    if next(source, _END) is not _END:
        raise ValueError("more leaves than the template has")
    return rebuilt


_END = object()


def _unflatten(template: Any, source: Iterator[Any], is_leaf: Leaf | None) -> Any:
    if not _is_container(template, is_leaf):
        return next(source)
    if template is None:
        return None
    if isinstance(template, dict):
        return {k: _unflatten(template[k], source, is_leaf) for k in sorted(template)}
    children = [_unflatten(t, source, is_leaf) for t in template]
    return children if isinstance(template, list) else tuple(children)


def tree_add(a: Any, b: Any) -> Any:
    """Leaf-wise ``a + b`` of two trees of one structure; a whole tree of ``None`` acts as zero."""
    if a is None:
        return b
    if b is None:
        return a
    return tree_map(lambda x, y: x + y, a, b)


def _check_same_node(tree: Any, other: Any, path: str) -> None:
    where = path or "<root>"
    if tree is None or other is None:
        if tree is not other:
            raise ValueError(f"trees differ at {where}: {_describe(tree)} vs {_describe(other)}")
    elif isinstance(tree, dict):
        if not isinstance(other, dict) or set(other) != set(tree):
            raise ValueError(f"trees differ at {where}: keys {sorted(tree)} vs {_describe(other)}")
    elif type(other) is not type(tree) or len(other) != len(tree):
        raise ValueError(f"trees differ at {where}: {_describe(tree)} vs {_describe(other)}")


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def _describe(node: Any) -> str:
    if isinstance(node, dict):
        return f"keys {sorted(node)}"
    if isinstance(node, (list, tuple)):
        return f"a {type(node).__name__} of {len(node)} entries"
    return "None" if node is None else type(node).__name__

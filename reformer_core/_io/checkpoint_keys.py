"""Checkpoint member names: the parameter and optimizer pytrees flattened into named leaves and back.

Both checkpoint formats (:mod:`.npz`, :mod:`.checkpoint_safetensors`) store one array per leaf,
named by its pytree path under ``params/`` or ``optimizer/`` (``params/layers/0/attention/qk``),
beside a JSON *structure* (a tree of dicts, lists and leaf kinds) that rebuilds the pytrees.
This module holds those names (the special text entries included), :func:`flatten` (a pytree to
host arrays and its structure), :func:`leaf_kinds` (validating a stored structure) and
:func:`rebuild` (a structure and arrays back to a pytree).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import framework_of

FORMAT_KEY = "__format__"
CONFIG_KEY = "__config__"
METADATA_KEY = "__metadata__"
STRUCTURE_KEY = "__structure__"
SPECIAL_KEYS = (FORMAT_KEY, CONFIG_KEY, METADATA_KEY, STRUCTURE_KEY)
PARAMS = "params"
OPTIMIZER = "optimizer"
SCALAR_KINDS = ("int", "float", "bool")
LEAF_KINDS = ("array", "none", *SCALAR_KINDS)


def join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def flatten(tree: Any, key: str, arrays: dict, *, allow_scalars: bool = True, dtypes: dict | None = None) -> Any:
    """Fill ``arrays`` with the host arrays of ``tree``'s leaves; return its structure (JSON)."""
    if isinstance(tree, dict):
        structure = {}
        for name, subtree in tree.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise TypeError(
                    f"{key}: dict keys must be non-empty str without '/', got {name!r}; "
                    f"checkpoints name leaves by their path"
                )
            structure[name] = flatten(subtree, join(key, name), arrays, allow_scalars=allow_scalars, dtypes=dtypes)
        return structure
    if isinstance(tree, list):
        return [flatten(t, join(key, str(i)), arrays, allow_scalars=allow_scalars, dtypes=dtypes)
                for i, t in enumerate(tree)]
    if allow_scalars:
        if tree is None:
            return "none"
        if isinstance(tree, bool):
            arrays[key] = np.asarray(tree, dtype=np.bool_)
            return "bool"
        if isinstance(tree, int):
            try:
                arrays[key] = np.asarray(tree, dtype=np.int64)
            except OverflowError:
                raise TypeError(f"{key}: int {tree} does not fit in int64; store it as a float") from None
            return "int"
        if isinstance(tree, float):
            arrays[key] = np.asarray(tree, dtype=np.float64)
            return "float"
    arrays[key] = _to_host(key, tree, dtypes)
    return "array"


def _to_host(key: str, leaf: Any, dtypes: dict | None = None) -> np.ndarray:
    """A host NumPy copy of an array leaf, refusing anything NumPy cannot store exactly.

    With ``dtypes`` (a safetensors save), a bfloat16 leaf comes back as its exact float32
    widening and ``dtypes[key] = "bfloat16"`` (the writer stores the original bits)."""
    dtype_name = str(getattr(leaf, "dtype", ""))
    if "bfloat16" in dtype_name and dtypes is not None:
        if isinstance(leaf, (np.ndarray, np.generic)):  # ml_dtypes (JAX's host arrays)
            host = np.asarray(leaf).astype(np.float32)
        elif framework_of(leaf) is not None:
            from .._registry import backend_for

            host = np.asarray(backend_for(leaf).to_numpy(leaf))
            if host.dtype != np.float32:  # JAX hands back ml_dtypes bfloat16: widen exactly
                host = host.astype(np.float32)
        else:
            raise TypeError(f"{key} is a {type(leaf).__name__}; checkpoint leaves must be arrays")
        dtypes[key] = "bfloat16"
        return host
    if "bfloat16" in dtype_name:
        raise TypeError(
            f"{key} has dtype bfloat16, which NumPy (and so a .npz checkpoint) cannot store exactly; "
            f"cast the arrays to float32 first (no silent conversion), or save to a .safetensors path, "
            f"which stores bfloat16 exactly"
        )
    if isinstance(leaf, (np.ndarray, np.generic)):
        host = np.asarray(leaf)
    elif framework_of(leaf) is not None:
        from .._registry import backend_for

        host = np.asarray(backend_for(leaf).to_numpy(leaf))
    else:
        raise TypeError(
            f"{key} is a {type(leaf).__name__}; checkpoint leaves must be arrays "
            f"(or python int/float/bool/None in the optimizer state); use lists, not tuples"
        )
    if host.dtype.kind not in "biufc" or np.dtype(host.dtype.str) != host.dtype:
        raise TypeError(
            f"{key} has dtype {host.dtype}, which a .npz checkpoint cannot store exactly; "
            f"cast it to float32 (or another standard NumPy dtype) first"
        )
    return host


def param_shapes_by_key(config) -> dict[str, tuple[int, ...]]:
    """The member name (``params/<path>``) and shape of every parameter ``config`` implies."""
    from .._model.lm import param_shapes
    from .._tree import is_shape, tree_paths

    return {join(PARAMS, path): tuple(shape) for path, shape in tree_paths(param_shapes(config), is_leaf=is_shape)}


def kinds_of(structure: dict, name: str = "") -> dict:
    """``{key: kind}`` of every leaf of a ``{"params": tree, "optimizer": tree or None}``
    structure, validated (errors name checkpoint ``name``)."""
    out: dict[str, str] = {}
    leaf_kinds(name, structure[PARAMS], PARAMS, out)
    if structure[OPTIMIZER] is not None:
        leaf_kinds(name, structure[OPTIMIZER], OPTIMIZER, out)
    return out


def leaf_kinds(name: str, structure: Any, key: str, out: dict) -> None:
    """``out[key] = kind`` for every leaf of a stored structure (validating it)."""
    if isinstance(structure, dict):
        for child, sub in structure.items():
            if not child or "/" in child:
                raise ValueError(f"checkpoint {name}: {STRUCTURE_KEY} has an invalid key {child!r} under {key}")
            leaf_kinds(name, sub, join(key, child), out)
    elif isinstance(structure, list):
        for i, sub in enumerate(structure):
            leaf_kinds(name, sub, join(key, str(i)), out)
    elif structure in LEAF_KINDS:
        out[key] = structure
    else:
        raise ValueError(f"checkpoint {name}: {STRUCTURE_KEY} has an unknown leaf {structure!r} at {key}")


def rebuild(name: str, structure: Any, key: str, arrays: dict, place) -> Any:
    if isinstance(structure, dict):
        return {child: rebuild(name, sub, join(key, child), arrays, place) for child, sub in structure.items()}
    if isinstance(structure, list):
        return [rebuild(name, sub, join(key, str(i)), arrays, place) for i, sub in enumerate(structure)]
    if structure == "none":
        return None
    host = arrays[key]
    if structure == "array":
        return place(host, key)
    if host.ndim != 0:
        raise ValueError(f"checkpoint {name}: {key} should be a scalar ({structure}), got shape {host.shape}")
    if structure == "bool":
        if host.dtype != np.bool_:
            raise ValueError(f"checkpoint {name}: {key} should be a bool, got dtype {host.dtype}")
        return bool(host)
    if structure == "int":
        if host.dtype.kind not in "iu":
            raise ValueError(f"checkpoint {name}: {key} should be an int, got dtype {host.dtype}")
        return int(host)
    if host.dtype.kind != "f":
        raise ValueError(f"checkpoint {name}: {key} should be a float, got dtype {host.dtype}")
    return float(host)

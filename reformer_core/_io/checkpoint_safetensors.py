"""The ``.safetensors`` checkpoint layout: its writer, and loading that checks the whole header first.

``.safetensors`` layout (the format of the ``safetensors`` package, read and written by
``reformer_core._io.safetensors``, the project's own parser): one tensor per array leaf, named by the same paths
(``params/layers/0/attention/qk``, ``optimizer/m/...``), in its dtype (bfloat16 included, bit
for bit); the header's ``__metadata__`` (string values only) holds ``format: "pt"``,
``reformer_core: "reformer-core-checkpoint/1"`` and, as JSON text, ``config``, ``metadata``,
``structure`` (as in :mod:`.npz`) and ``scalars`` (the optimizer state's python ints/floats/bools, e.g.
the step, by path). Loading parses and checks the whole header (dtypes, shapes against
``param_shapes(config)``, byte ranges inside the file and not overlapping, the optimizer
bounds of :mod:`.checkpoint_meta`) before it reads any tensor data.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import numpy as np

from .._config import ReformerConfig
from .checkpoint_keys import (CONFIG_KEY, METADATA_KEY, OPTIMIZER, PARAMS, SCALAR_KINDS, STRUCTURE_KEY, flatten,
                              kinds_of, param_shapes_by_key)
from .checkpoint_meta import (FORMAT_NAME, FORMAT_VERSION, MAX_TEXT_BYTES, OPTIMIZER_LEAF_BYTES_PER_PARAM,
                              OPTIMIZER_TOTAL_FACTOR, check_marker, config_difference, json_entry, listing,
                              stored_config, text_array, unreadable)

_ST_MARKER = "reformer_core"


def safetensors_writer(params: dict, config: ReformerConfig, optimizer_state: Any,
                       metadata_text: str) -> Callable[[Any], None]:
    """A ``write(file)`` that writes the ``.safetensors`` checkpoint; the leaves are flattened
    (and refused, if they cannot be stored) now, before any file is opened."""
    from .safetensors import write_safetensors_to

    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    scalars: dict[str, Any] = {}
    structure = {
        PARAMS: flatten(params, PARAMS, arrays, allow_scalars=False, dtypes=dtypes),
        OPTIMIZER: None if optimizer_state is None else flatten(optimizer_state, OPTIMIZER, arrays, dtypes=dtypes),
    }
    for key, kind in kinds_of(structure).items():
        if kind in SCALAR_KINDS:  # python scalars go into the header as JSON, not as tensors
            value = arrays.pop(key).item()
            if kind == "float" and not math.isfinite(value):
                value = repr(value)  # 'nan', 'inf', '-inf': JSON has no such numbers
            scalars[key] = value
    header = {
        "format": "pt",
        _ST_MARKER: f"{FORMAT_NAME}/{FORMAT_VERSION}",
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "metadata": metadata_text,
        "structure": json.dumps(structure),
        "scalars": json.dumps(scalars),
    }
    return lambda file: write_safetensors_to(file, arrays, dtypes=dtypes, metadata=header)


def load_safetensors(name: str, config: ReformerConfig | None):
    """``(config, metadata, structure, host arrays by key, bfloat16 keys)`` of a
    ``.safetensors`` checkpoint. The whole header is checked (by the ``validate`` hook of
    ``read_safetensors``) before any tensor data is read."""
    from .safetensors import read_safetensors

    if not os.path.exists(name):
        raise FileNotFoundError(f"checkpoint file {name} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"checkpoint {name} is a folder, not a .safetensors file")
    found: dict[str, Any] = {}

    def validate(entries: dict, header: dict) -> None:
        marker = header.get(_ST_MARKER)
        if marker is None:
            raise ValueError(
                f"{name} is a safetensors file, but not a reformer-core checkpoint (its header has no "
                f"{_ST_MARKER!r} entry): for an HF model folder use reformer_core.from_pretrained"
            )
        check_marker(name, marker)
        for key in ("config", "metadata", "structure", "scalars"):
            if key not in header:
                raise ValueError(f"checkpoint {name}: its header lacks {key!r}; it was not written by save_checkpoint")
            if len(header[key].encode("utf-8")) > MAX_TEXT_BYTES:
                raise ValueError(f"checkpoint {name}: header entry {key!r} is larger than {MAX_TEXT_BYTES} bytes")
        texts = {key: text_array(header[key]) for key in ("config", "metadata", "structure", "scalars")}
        stored = stored_config(name, {CONFIG_KEY: texts["config"]})
        if config is not None and config != stored:
            raise ValueError(config_difference(name, stored, config))
        metadata = json_entry(name, {METADATA_KEY: texts["metadata"]}, METADATA_KEY)
        if not isinstance(metadata, dict):
            raise ValueError(f"checkpoint {name}: its metadata is not a JSON object")
        structure = json_entry(name, {STRUCTURE_KEY: texts["structure"]}, STRUCTURE_KEY)
        if not isinstance(structure, dict) or set(structure) != {PARAMS, OPTIMIZER}:
            raise ValueError(f"checkpoint {name}: its structure must hold 'params' and 'optimizer' trees")
        scalars = json_entry(name, {"scalars": texts["scalars"]}, "scalars")
        if not isinstance(scalars, dict):
            raise ValueError(f"checkpoint {name}: its scalars are not a JSON object")
        kinds = kinds_of(structure, name)
        tensors = {key for key, kind in kinds.items() if kind == "array"}
        wanted_scalars = {key for key, kind in kinds.items() if kind in SCALAR_KINDS}
        missing, extra = sorted(tensors - set(entries)), sorted(set(entries) - tensors)
        if missing:
            raise ValueError(f"checkpoint {name} is missing tensors {listing(missing)}; the file is incomplete "
                             f"or damaged")
        if extra:
            raise ValueError(f"checkpoint {name} has unexpected tensors {listing(extra)}, not in its structure")
        if set(scalars) != wanted_scalars:
            raise ValueError(f"checkpoint {name}: its scalars {listing(sorted(scalars))} do not match the "
                             f"structure's {listing(sorted(wanted_scalars))}")
        _check_tensor_sizes(name, entries, stored)
        found.update(config=stored, metadata=metadata, structure=structure, scalars=scalars, kinds=kinds)

    try:
        arrays, dtypes, _ = read_safetensors(name, validate=validate)
    except OSError as error:
        raise unreadable(name, f"cannot read it: {error}") from None
    except ValueError as error:
        text = str(error)
        if text.startswith(f"checkpoint {name}") or text.startswith(name):
            raise
        raise unreadable(name, text) from None
    for key, value in found["scalars"].items():
        arrays[key] = _scalar_array(name, key, found["kinds"][key], value)
    widened = {key for key, dtype in dtypes.items() if dtype == "bfloat16"}
    return found["config"], found["metadata"], found["structure"], arrays, widened


def _scalar_array(name: str, key: str, kind: str, value: Any) -> np.ndarray:
    """The 0-d array ``rebuild`` expects for a scalar stored as JSON in the header."""
    if kind == "bool" and isinstance(value, bool):
        return np.asarray(value, dtype=np.bool_)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return np.asarray(value, dtype=np.int64)
    if kind == "float":
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            return np.asarray(float(value), dtype=np.float64)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return np.asarray(float(value), dtype=np.float64)
    raise ValueError(f"checkpoint {name}: scalar {key} should be a {kind}, got {value!r}")


_ST_FLOAT_TAGS = ("F16", "BF16", "F32", "F64")


def _check_tensor_sizes(name: str, entries: dict, config: ReformerConfig) -> None:
    """The header's shapes and dtypes against ``param_shapes(config)`` and the optimizer bounds."""
    shapes = param_shapes_by_key(config)
    total_elements = sum(math.prod(shape) for shape in shapes.values())
    optimizer_leaf = OPTIMIZER_LEAF_BYTES_PER_PARAM * total_elements
    optimizer_total = OPTIMIZER_TOTAL_FACTOR * optimizer_leaf
    optimizer_sum = 0
    for key in sorted(entries):
        tag, shape, begin, end = entries[key]
        if key.startswith(PARAMS + "/"):
            if key not in shapes:
                raise ValueError(f"checkpoint {name}: {key} is not a parameter of the stored config")
            if shape != shapes[key]:
                raise ValueError(
                    f"checkpoint {name}: parameter {key} has shape {shape} in its header, but the stored config "
                    f"needs {shapes[key]}; were these params saved with another config?"
                )
            if tag not in _ST_FLOAT_TAGS:
                raise ValueError(f"checkpoint {name}: parameter {key} has dtype {tag}; parameters are floating")
            continue
        nbytes = end - begin
        optimizer_sum += nbytes
        if nbytes > optimizer_leaf:
            raise ValueError(
                f"checkpoint {name}: tensor {key} declares {nbytes} bytes, more than the {optimizer_leaf} an "
                f"optimizer-state leaf may hold ({OPTIMIZER_LEAF_BYTES_PER_PARAM} bytes per parameter element, "
                f"{total_elements} elements); refused before reading it"
            )
        if optimizer_sum > optimizer_total:
            raise ValueError(
                f"checkpoint {name}: the optimizer-state tensors declare {optimizer_sum} bytes, more than the "
                f"{optimizer_total} they may hold together; refused before reading them"
            )

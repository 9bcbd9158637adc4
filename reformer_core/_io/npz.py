"""The ``.npz`` checkpoint format: its arrays, and loading that validates before it decompresses.

``.npz`` layout (a plain NumPy ``.npz`` archive, uncompressed, no pickled objects):

==================  =====================================================================
``__format__``      uint8 UTF-8 text ``"reformer-core-checkpoint/1"``
``__config__``      uint8 UTF-8 JSON of ``config.to_dict()``
``__metadata__``    uint8 UTF-8 JSON of the user's metadata dict
``__structure__``   uint8 UTF-8 JSON ``{"params": tree, "optimizer": tree or null}``; a tree is
                    a JSON object (dict), a JSON array (list) or a leaf kind: ``"array"``,
                    ``"int"``, ``"float"``, ``"bool"``, ``"none"``
``params/<path>``   one array per parameter leaf, e.g. ``params/layers/0/attention/qk``
``optimizer/<path>`` one array per optimizer-state leaf; python scalars as 0-d arrays
==================  =====================================================================

Paths are those of the pytree helpers (``layers/0/attention/qk``). The file can be inspected with
``numpy.load(path, allow_pickle=False)`` alone.

Loading validates before it decompresses: the zip directory's declared (uncompressed) size
of every entry, then each entry's ``.npy`` header (a few hundred bytes), are checked against
what the stored config implies (the parameter shapes of ``param_shapes(config)``; a bound for
the optimizer state and the text entries) before any array data is read, so a damaged or
crafted file (a zip bomb) is refused without the memory it claims. The config itself is
trusted to size the model: a config that implies a huge model makes its (real) parameters
that large.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from typing import Any, NamedTuple

import numpy as np

from .._config import ReformerConfig
from .checkpoint_keys import (CONFIG_KEY, FORMAT_KEY, METADATA_KEY, OPTIMIZER, PARAMS, SPECIAL_KEYS, STRUCTURE_KEY,
                              flatten, kinds_of, param_shapes_by_key)
from .checkpoint_meta import (FORMAT_NAME, FORMAT_VERSION, MAX_TEXT_BYTES, OPTIMIZER_LEAF_BYTES_PER_PARAM,
                              OPTIMIZER_TOTAL_FACTOR, check_marker, config_difference, json_entry, listing,
                              stored_config, text_array, text_entry, unreadable)


def npz_arrays(params: dict, config: ReformerConfig, optimizer_state: Any, metadata_text: str) -> dict[str, np.ndarray]:
    """The entries of an ``.npz`` checkpoint, by key (what ``numpy.savez`` writes)."""
    arrays: dict[str, np.ndarray] = {}
    structure = {
        PARAMS: flatten(params, PARAMS, arrays, allow_scalars=False),
        OPTIMIZER: None if optimizer_state is None else flatten(optimizer_state, OPTIMIZER, arrays),
    }
    arrays[FORMAT_KEY] = text_array(f"{FORMAT_NAME}/{FORMAT_VERSION}")
    arrays[CONFIG_KEY] = text_array(json.dumps(config.to_dict(), sort_keys=True))
    arrays[METADATA_KEY] = text_array(metadata_text)
    arrays[STRUCTURE_KEY] = text_array(json.dumps(structure))
    return arrays


def load_npz_arrays(name: str, config: ReformerConfig | None):
    """``(config, metadata, structure, host arrays by key)`` of an ``.npz`` checkpoint, every
    size checked before any array data is read."""
    members = _members(name)
    # The special entries first (bounded by MAX_TEXT_BYTES each): the config sizes the rest.
    arrays = _read_members(name, members, [key for key in SPECIAL_KEYS if key in members])
    _check_format(name, arrays)
    stored = stored_config(name, arrays)
    if config is not None and config != stored:
        raise ValueError(config_difference(name, stored, config))
    metadata = json_entry(name, arrays, METADATA_KEY) if METADATA_KEY in arrays else {}
    if not isinstance(metadata, dict):
        raise ValueError(f"checkpoint {name}: {METADATA_KEY} is not a JSON object")
    structure = json_entry(name, arrays, STRUCTURE_KEY)
    if not isinstance(structure, dict) or set(structure) != {PARAMS, OPTIMIZER}:
        raise ValueError(f"checkpoint {name}: {STRUCTURE_KEY} must hold 'params' and 'optimizer' trees")

    expected = kinds_of(structure, name)
    present = set(members) - set(SPECIAL_KEYS)
    needed = {key for key, kind in expected.items() if kind != "none"}
    missing, extra = sorted(needed - present), sorted(present - needed)
    if missing:
        raise ValueError(f"checkpoint {name} is missing leaves {listing(missing)}; the file is incomplete or damaged")
    if extra:
        raise ValueError(f"checkpoint {name} has unexpected entries {listing(extra)}, not in its {STRUCTURE_KEY}")
    # Every size is checked against what the config implies before any array data is read.
    _check_sizes(name, members, sorted(needed), stored)
    arrays.update(_read_members(name, members, sorted(needed)))
    for key in needed:
        if arrays[key].dtype.kind not in "biufc":
            raise ValueError(f"checkpoint {name}: {key} has unsupported dtype {arrays[key].dtype}")

    return stored, metadata, structure, arrays


def _check_format(name: str, arrays: dict) -> None:
    if FORMAT_KEY not in arrays:
        raise ValueError(
            f"{name} has no {FORMAT_KEY} entry: it is an .npz file, but not a reformer-core checkpoint "
            f"(write checkpoints with reformer_core.save_checkpoint)"
        )
    check_marker(name, text_entry(name, arrays, FORMAT_KEY))


class _Member(NamedTuple):
    """One ``<key>.npy`` entry of the archive, as its zip directory declares it."""

    info: zipfile.ZipInfo
    declared: int  # uncompressed bytes, header included (ZipInfo.file_size)


def _members(name: str) -> dict[str, _Member]:
    """The archive's entries by key, read from the zip directory alone (no data decompressed)."""
    if not os.path.exists(name):
        raise FileNotFoundError(f"checkpoint file {name} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"checkpoint {name} is a folder, not a .npz file")
    try:
        with open(name, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise unreadable(name, f"cannot read it: {error}") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise unreadable(name, "not a .npz (zip) archive; a safetensors checkpoint must be named *.safetensors")
    try:
        with zipfile.ZipFile(name) as archive:
            infos = archive.infolist()
    except _READ_ERRORS as error:
        raise unreadable(name, f"{type(error).__name__}: {error}") from None
    members: dict[str, _Member] = {}
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise ValueError(f"checkpoint {name} has unexpected entry {info.filename!r}; "
                             f"a checkpoint holds only .npy arrays")
        key = info.filename[: -len(".npy")]
        if key in members:
            raise ValueError(f"checkpoint {name} holds entry {info.filename!r} twice; the file is damaged or crafted")
        members[key] = _Member(info, info.file_size)
    return members


# Bounds on what one entry may declare before it is decompressed, beside those of
# checkpoint_meta: the .npy header of an entry is at most _HEADER_BYTES.
_HEADER_BYTES = 64 * 2**10
_MAX_ITEMSIZE = 8  # float64 / int64: the widest dtype a parameter leaf may use


def _too_large(name: str, key: str, declared: int, limit: int, why: str) -> ValueError:
    return ValueError(
        f"checkpoint {name}: entry {key}.npy declares {declared} bytes uncompressed, more than the {limit} {why}; "
        f"refused before decompressing it (the file is damaged, or crafted to exhaust memory)"
    )


def _check_sizes(name: str, members: dict, keys: list[str], config: ReformerConfig) -> None:
    """Compare each entry's declared size and .npy header with what ``config`` implies,
    reading only the headers (a few hundred bytes each)."""
    shapes = param_shapes_by_key(config)
    elements = {key: math.prod(shape) for key, shape in shapes.items()}
    total_elements = sum(elements.values())
    largest = max(elements.values(), default=0)
    optimizer_leaf = OPTIMIZER_LEAF_BYTES_PER_PARAM * total_elements + _HEADER_BYTES
    optimizer_total = OPTIMIZER_TOTAL_FACTOR * optimizer_leaf
    optimizer_sum = 0
    for key in keys:
        declared = members[key].declared
        if key in shapes:
            limit = elements[key] * _MAX_ITEMSIZE + _HEADER_BYTES
            why = f"bytes parameter {key} of shape {shapes[key]} can take in any dtype"
        elif key.startswith(PARAMS + "/"):  # not a parameter of the config: check_params names it later
            limit = largest * _MAX_ITEMSIZE + _HEADER_BYTES
            why = "bytes of the config's largest parameter"
        else:
            limit = optimizer_leaf
            why = (f"bytes an optimizer-state leaf may hold ({OPTIMIZER_LEAF_BYTES_PER_PARAM} bytes per parameter "
                   f"element, {total_elements} elements)")
            optimizer_sum += declared
            if optimizer_sum > optimizer_total:
                raise _too_large(name, key, optimizer_sum, optimizer_total,
                                 "bytes all optimizer-state leaves together may hold")
        if declared > limit:
            raise _too_large(name, key, declared, limit, why)
    for key in keys:
        shape, _, _ = _header(name, members, key)
        if key in shapes and shape != shapes[key]:
            raise ValueError(
                f"checkpoint {name}: parameter {key} has shape {shape} in its .npy header, but the stored config "
                f"needs {shapes[key]}; were these params saved with another config?"
            )


def _header(name: str, members: dict, key: str):
    """``(shape, dtype, data offset)`` of entry ``key``, decompressing only its .npy header."""
    try:
        with zipfile.ZipFile(name) as archive, archive.open(members[key].info) as file:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
            else:
                raise ValueError(f"{key}.npy has .npy format version {version}, which checkpoints do not use")
            offset = file.tell()
    except ValueError as error:
        raise unreadable(name, f"entry {key}.npy: {error}") from None
    except _READ_ERRORS as error:
        raise unreadable(name, f"entry {key}.npy: {type(error).__name__}: {error}") from None
    if dtype.hasobject:
        raise _pickled(name)
    shape = tuple(int(n) for n in shape)
    # numpy allocates the array the header describes before reading: it must be what the entry holds.
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes != members[key].declared:
        raise ValueError(
            f"checkpoint {name}: entry {key}.npy declares {members[key].declared} bytes, but its .npy header "
            f"describes {offset + nbytes} ({dtype} {shape}); the file is damaged or crafted"
        )
    return shape, dtype, offset


def _pickled(name: str) -> ValueError:
    return ValueError(
        f"checkpoint {name} contains pickled Python objects; reformer-core checkpoints never do, "
        f"and loading pickles can run arbitrary code, so it is refused"
    )


def _read_members(name: str, members: dict, keys: list[str]) -> dict[str, np.ndarray]:
    """The arrays of entries ``keys``; text entries are size-checked first (the rest were)."""
    for key in keys:
        if key in SPECIAL_KEYS and members[key].declared > MAX_TEXT_BYTES + _HEADER_BYTES:
            raise _too_large(name, key, members[key].declared, MAX_TEXT_BYTES + _HEADER_BYTES,
                             "bytes a text entry may hold")
    out = {}
    try:
        with zipfile.ZipFile(name) as archive:
            for key in keys:
                if key in SPECIAL_KEYS:
                    _header(name, members, key)  # refuses headers that claim more than the entry holds
                with archive.open(members[key].info) as file:
                    out[key] = np.lib.format.read_array(file, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise _pickled(name) from None
        if str(error).startswith(f"checkpoint {name}") or str(error).startswith(f"{name} is not"):
            raise
        raise unreadable(name, str(error)) from None
    except _READ_ERRORS as error:
        raise unreadable(name, f"{type(error).__name__}: {error}") from None
    return out


# What a damaged or foreign zip can raise while numpy reads it (besides ValueError).
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, NotImplementedError, KeyError)

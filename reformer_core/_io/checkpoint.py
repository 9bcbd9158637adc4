"""Checkpoints: parameters, config, optimizer state and metadata in one ``.npz`` or
``.safetensors`` file (chosen by the file's suffix).

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

``.safetensors`` layout (the format of the ``safetensors`` package, read and written by
``reformer_core._io.safetensors``, the project's own parser): one tensor per array leaf, named by the same paths
(``params/layers/0/attention/qk``, ``optimizer/m/...``), in its dtype (bfloat16 included, bit
for bit); the header's ``__metadata__`` (string values only) holds ``format: "pt"``,
``reformer_core: "reformer-core-checkpoint/1"`` and, as JSON text, ``config``, ``metadata``,
``structure`` (as above) and ``scalars`` (the optimizer state's python ints/floats/bools, e.g.
the step, by path). Loading parses and checks the whole header (dtypes, shapes against
``param_shapes(config)``, byte ranges inside the file and not overlapping, the optimizer
bounds below) before it reads any tensor data.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
import zlib
from typing import Any, NamedTuple

import numpy as np

from .._arrays import framework_of
from .._config import ReformerConfig

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "reformer-core-checkpoint"
FORMAT_VERSION = 1

_FORMAT_KEY = "__format__"
_CONFIG_KEY = "__config__"
_METADATA_KEY = "__metadata__"
_STRUCTURE_KEY = "__structure__"
_SPECIAL_KEYS = (_FORMAT_KEY, _CONFIG_KEY, _METADATA_KEY, _STRUCTURE_KEY)
_PARAMS = "params"
_OPTIMIZER = "optimizer"
_SCALAR_KINDS = ("int", "float", "bool")
_LEAF_KINDS = ("array", "none", *_SCALAR_KINDS)


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    params: dict
    config: ReformerConfig
    optimizer_state: Any
    metadata: dict


# ---------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike,
    params: dict,
    config: ReformerConfig,
    *,
    optimizer_state: Any = None,
    metadata: dict | None = None,
) -> None:
    """Write ``params`` (and optionally optimizer state and metadata) to one ``.npz`` file.

    Args:
        path: the file to write, used exactly as given (no suffix is added). It is written
            atomically: a temporary file in the same folder, then ``os.replace``, so a
            crash never leaves a half-written checkpoint at ``path``.
        params: the parameter pytree of ``config`` (from :func:`init_params` or training),
            on any backend; arrays are copied to the host with their backend's ``to_numpy``.
        config: the :class:`ReformerConfig` the params belong to (checked with
            ``check_params``).
        optimizer_state: a pytree of dicts and lists whose leaves are arrays, python
            ints/floats/bools (e.g. a step count) or None.
        metadata: a JSON-serialisable dict (str keys), e.g. ``{"step": 1000, "loss": 2.1}``.

    The format follows the suffix: ``.safetensors`` writes a safetensors file (config,
    metadata, structure and the optimizer's python scalars as JSON in its header), anything
    else the ``.npz`` archive. Dtypes are kept exactly; bfloat16 leaves (torch, JAX) are
    stored bit for bit in ``.safetensors``, while in ``.npz`` (which NumPy cannot hold them
    in) they raise TypeError: cast them to float32 first, or save as ``.safetensors``.
    """
    from .._model.lm import check_params

    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    check_params(params, config)
    metadata_text = _metadata_json({} if metadata is None else metadata)
    if _is_safetensors(path):
        _save_safetensors(os.fspath(path), params, config, optimizer_state, metadata_text)
        return

    arrays: dict[str, np.ndarray] = {}
    structure = {
        _PARAMS: _flatten(params, _PARAMS, arrays, allow_scalars=False),
        _OPTIMIZER: None if optimizer_state is None else _flatten(optimizer_state, _OPTIMIZER, arrays),
    }
    arrays[_FORMAT_KEY] = _text_array(f"{FORMAT_NAME}/{FORMAT_VERSION}")
    arrays[_CONFIG_KEY] = _text_array(json.dumps(config.to_dict(), sort_keys=True))
    arrays[_METADATA_KEY] = _text_array(metadata_text)
    arrays[_STRUCTURE_KEY] = _text_array(json.dumps(structure))
    _write_atomically(os.fspath(path), arrays)


def _metadata_json(metadata: Any) -> str:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of JSON data, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"metadata must be JSON data (dicts, lists, str, finite numbers, bool, None): {error}"
        ) from None
    if len(text.encode("utf-8")) > _MAX_TEXT_BYTES:
        raise ValueError(
            f"metadata takes {len(text.encode('utf-8'))} bytes as JSON, more than the {_MAX_TEXT_BYTES} a checkpoint "
            f"stores (load_checkpoint refuses larger text entries); keep large data in optimizer_state arrays"
        )
    if json.loads(text) != metadata:
        raise TypeError(
            "metadata does not survive JSON unchanged (tuples become lists, non-str keys become str); "
            "use lists and str keys"
        )
    return text


def _text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _flatten(tree: Any, key: str, arrays: dict, *, allow_scalars: bool = True, dtypes: dict | None = None) -> Any:
    """Fill ``arrays`` with the host arrays of ``tree``'s leaves; return its structure (JSON)."""
    if isinstance(tree, dict):
        structure = {}
        for name, subtree in tree.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise TypeError(
                    f"{key}: dict keys must be non-empty str without '/', got {name!r}; "
                    f"checkpoints name leaves by their path"
                )
            structure[name] = _flatten(subtree, _join(key, name), arrays, allow_scalars=allow_scalars, dtypes=dtypes)
        return structure
    if isinstance(tree, list):
        return [_flatten(t, _join(key, str(i)), arrays, allow_scalars=allow_scalars, dtypes=dtypes)
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


def _is_safetensors(path) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


_ST_MARKER = "reformer_core"


def _save_safetensors(path: str, params: dict, config: ReformerConfig, optimizer_state: Any, metadata_text: str):
    from .safetensors import write_safetensors_to

    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    scalars: dict[str, Any] = {}
    structure = {
        _PARAMS: _flatten(params, _PARAMS, arrays, allow_scalars=False, dtypes=dtypes),
        _OPTIMIZER: None if optimizer_state is None else _flatten(optimizer_state, _OPTIMIZER, arrays, dtypes=dtypes),
    }
    for key, kind in _kinds_of(structure).items():
        if kind in _SCALAR_KINDS:  # python scalars go into the header as JSON, not as tensors
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
    _write_atomically(path, arrays, lambda file: write_safetensors_to(file, arrays, dtypes=dtypes, metadata=header))


def _kinds_of(structure: dict) -> dict:
    out: dict[str, str] = {}
    _leaf_kinds("", structure[_PARAMS], _PARAMS, out)
    if structure[_OPTIMIZER] is not None:
        _leaf_kinds("", structure[_OPTIMIZER], _OPTIMIZER, out)
    return out


def _write_atomically(path: str, arrays: dict, write=None) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"cannot save checkpoint {path}: it is a folder; give a file name such as model.npz")
    temp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, like a plain open().
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            (write or (lambda f: _write_npz(f, arrays)))(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.remove(temp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _write_npz(file, arrays: dict) -> None:
    np.savez(file, allow_pickle=False, **arrays)


def _fsync_folder(folder: str) -> None:
    """Make the rename durable where the OS allows it (POSIX); best effort elsewhere."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike,
    *,
    config: ReformerConfig | None = None,
    backend: Any = None,
    dtype: Any = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.npz`` or ``.safetensors`` file (the format follows the suffix).
        config: when given, it must equal the stored config (ValueError naming the
            differing fields otherwise).
        backend: where to put the arrays: a name (``"numpy"``, ``"strict:device1"``) or a
            backend object; default ``get_backend()``.
        dtype: cast floating arrays (params and optimizer state) to this floating dtype
            (float16, bfloat16, float32 or float64; anything else raises TypeError before the
            file is read); default: keep the stored dtypes (bfloat16 from a ``.safetensors`` file
            needs a backend that has it, e.g. ``backend="torch"``, else TypeError: pass
            ``dtype="float32"``, which is exact). Integer and bool leaves keep theirs.

    Returns:
        ``Checkpoint(params, config, optimizer_state, metadata)``; python scalars of the
        optimizer state come back as python ints/floats/bools.

    Raises ValueError naming the file for anything wrong with it: not a readable ``.npz``,
    truncated or corrupted, pickled objects inside, missing or unknown format marker,
    missing or unexpected leaves, params that do not fit the stored config, and any entry
    larger than the stored config allows (checked from the zip directory and the .npy headers
    before any data is decompressed: each parameter must have its config shape; an
    optimizer-state leaf may hold at most 16 bytes per parameter element, all of them together
    8 times that; each text entry at most 16 MiB). For ``.safetensors`` the same checks run on
    its header (plus byte ranges inside the file and not overlapping, a header of at most
    100 MiB) before any tensor data is read.
    """
    from .._registry import resolve_backend
    from .._model.lm import check_params, parameter_dtype

    name = os.fspath(path)
    if config is not None and not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig or None, got {type(config).__name__}")
    target = resolve_backend(backend)
    if dtype is not None:
        parameter_dtype(target, dtype)  # integer or unknown dtypes fail here, before reading the file

    if _is_safetensors(name):
        stored_config, metadata, structure, arrays, widened = _load_safetensors(name, config)
    else:
        stored_config, metadata, structure, arrays = _load_npz_arrays(name, config)
        widened = set()

    host_params = _rebuild(name, structure[_PARAMS], _PARAMS, arrays, lambda a, key=None: a)
    if not isinstance(host_params, dict):
        raise ValueError(f"checkpoint {name}: params must be a dict of arrays, got a {type(host_params).__name__}")
    try:
        check_params(host_params, stored_config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {name}: {error}") from None

    if widened and dtype is None:
        try:
            parameter_dtype(target, "bfloat16")
        except (TypeError, ValueError):
            raise TypeError(
                f"checkpoint {name} stores bfloat16 arrays, which backend {target.name!r} cannot hold; pass "
                f"dtype='float32' (exact for bfloat16) or a backend that has bfloat16, e.g. backend='torch'"
            ) from None

    def place(host: np.ndarray, key: str | None = None):
        cast = dtype if dtype is not None and host.dtype.kind in "fc" else None
        if cast is None and key in widened:
            cast = parameter_dtype(target, "bfloat16")  # exact: the float32 values are bfloat16 numbers
        return target.from_numpy(host, dtype=cast)

    params = _rebuild(name, structure[_PARAMS], _PARAMS, arrays, place)
    optimizer_state = (
        None if structure[_OPTIMIZER] is None else _rebuild(name, structure[_OPTIMIZER], _OPTIMIZER, arrays, place)
    )
    return Checkpoint(params=params, config=stored_config, optimizer_state=optimizer_state, metadata=metadata)


def _load_npz_arrays(name: str, config: ReformerConfig | None):
    """``(config, metadata, structure, host arrays by key)`` of an ``.npz`` checkpoint, every
    size checked before any array data is read."""
    members = _members(name)
    # The special entries first (bounded by _MAX_TEXT_BYTES each): the config sizes the rest.
    arrays = _read_members(name, members, [key for key in _SPECIAL_KEYS if key in members])
    _check_format(name, arrays)
    stored_config = _stored_config(name, arrays)
    if config is not None and config != stored_config:
        raise ValueError(_config_difference(name, stored_config, config))
    metadata = _json_entry(name, arrays, _METADATA_KEY) if _METADATA_KEY in arrays else {}
    if not isinstance(metadata, dict):
        raise ValueError(f"checkpoint {name}: {_METADATA_KEY} is not a JSON object")
    structure = _json_entry(name, arrays, _STRUCTURE_KEY)
    if not isinstance(structure, dict) or set(structure) != {_PARAMS, _OPTIMIZER}:
        raise ValueError(f"checkpoint {name}: {_STRUCTURE_KEY} must hold 'params' and 'optimizer' trees")

    expected: dict[str, str] = {}
    _leaf_kinds(name, structure[_PARAMS], _PARAMS, expected)
    if structure[_OPTIMIZER] is not None:
        _leaf_kinds(name, structure[_OPTIMIZER], _OPTIMIZER, expected)
    present = set(members) - set(_SPECIAL_KEYS)
    needed = {key for key, kind in expected.items() if kind != "none"}
    missing, extra = sorted(needed - present), sorted(present - needed)
    if missing:
        raise ValueError(f"checkpoint {name} is missing leaves {_listing(missing)}; the file is incomplete or damaged")
    if extra:
        raise ValueError(f"checkpoint {name} has unexpected entries {_listing(extra)}, not in its {_STRUCTURE_KEY}")
    # Every size is checked against what the config implies before any array data is read.
    _check_sizes(name, members, sorted(needed), stored_config)
    arrays.update(_read_members(name, members, sorted(needed)))
    for key in needed:
        if arrays[key].dtype.kind not in "biufc":
            raise ValueError(f"checkpoint {name}: {key} has unsupported dtype {arrays[key].dtype}")

    return stored_config, metadata, structure, arrays


def _load_safetensors(name: str, config: ReformerConfig | None):
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
        _check_marker(name, marker)
        for key in ("config", "metadata", "structure", "scalars"):
            if key not in header:
                raise ValueError(f"checkpoint {name}: its header lacks {key!r}; it was not written by save_checkpoint")
            if len(header[key].encode("utf-8")) > _MAX_TEXT_BYTES:
                raise ValueError(f"checkpoint {name}: header entry {key!r} is larger than {_MAX_TEXT_BYTES} bytes")
        texts = {key: _text_array(header[key]) for key in ("config", "metadata", "structure", "scalars")}
        stored_config = _stored_config(name, {_CONFIG_KEY: texts["config"]})
        if config is not None and config != stored_config:
            raise ValueError(_config_difference(name, stored_config, config))
        metadata = _json_entry(name, {_METADATA_KEY: texts["metadata"]}, _METADATA_KEY)
        if not isinstance(metadata, dict):
            raise ValueError(f"checkpoint {name}: its metadata is not a JSON object")
        structure = _json_entry(name, {_STRUCTURE_KEY: texts["structure"]}, _STRUCTURE_KEY)
        if not isinstance(structure, dict) or set(structure) != {_PARAMS, _OPTIMIZER}:
            raise ValueError(f"checkpoint {name}: its structure must hold 'params' and 'optimizer' trees")
        scalars = _json_entry(name, {"scalars": texts["scalars"]}, "scalars")
        if not isinstance(scalars, dict):
            raise ValueError(f"checkpoint {name}: its scalars are not a JSON object")
        kinds: dict[str, str] = {}
        _leaf_kinds(name, structure[_PARAMS], _PARAMS, kinds)
        if structure[_OPTIMIZER] is not None:
            _leaf_kinds(name, structure[_OPTIMIZER], _OPTIMIZER, kinds)
        tensors = {key for key, kind in kinds.items() if kind == "array"}
        wanted_scalars = {key for key, kind in kinds.items() if kind in _SCALAR_KINDS}
        missing, extra = sorted(tensors - set(entries)), sorted(set(entries) - tensors)
        if missing:
            raise ValueError(f"checkpoint {name} is missing tensors {_listing(missing)}; the file is incomplete "
                             f"or damaged")
        if extra:
            raise ValueError(f"checkpoint {name} has unexpected tensors {_listing(extra)}, not in its structure")
        if set(scalars) != wanted_scalars:
            raise ValueError(f"checkpoint {name}: its scalars {_listing(sorted(scalars))} do not match the "
                             f"structure's {_listing(sorted(wanted_scalars))}")
        _check_tensor_sizes(name, entries, stored_config)
        found.update(config=stored_config, metadata=metadata, structure=structure, scalars=scalars, kinds=kinds)

    try:
        arrays, dtypes, _ = read_safetensors(name, validate=validate)
    except OSError as error:
        raise _unreadable(name, f"cannot read it: {error}") from None
    except ValueError as error:
        text = str(error)
        if text.startswith(f"checkpoint {name}") or text.startswith(name):
            raise
        raise _unreadable(name, text) from None
    for key, value in found["scalars"].items():
        arrays[key] = _scalar_array(name, key, found["kinds"][key], value)
    widened = {key for key, dtype in dtypes.items() if dtype == "bfloat16"}
    return found["config"], found["metadata"], found["structure"], arrays, widened


def _scalar_array(name: str, key: str, kind: str, value: Any) -> np.ndarray:
    """The 0-d array ``_rebuild`` expects for a scalar stored as JSON in the header."""
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
    from .._model.lm import param_shapes
    from .._tree import is_shape, tree_paths

    shapes = {_join(_PARAMS, path): tuple(shape) for path, shape in tree_paths(param_shapes(config), is_leaf=is_shape)}
    total_elements = sum(math.prod(shape) for shape in shapes.values())
    optimizer_leaf = _OPTIMIZER_LEAF_BYTES_PER_PARAM * total_elements
    optimizer_total = _OPTIMIZER_TOTAL_FACTOR * optimizer_leaf
    optimizer_sum = 0
    for key in sorted(entries):
        tag, shape, begin, end = entries[key]
        if key.startswith(_PARAMS + "/"):
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
                f"optimizer-state leaf may hold ({_OPTIMIZER_LEAF_BYTES_PER_PARAM} bytes per parameter element, "
                f"{total_elements} elements); refused before reading it"
            )
        if optimizer_sum > optimizer_total:
            raise ValueError(
                f"checkpoint {name}: the optimizer-state tensors declare {optimizer_sum} bytes, more than the "
                f"{optimizer_total} they may hold together; refused before reading them"
            )


def _check_marker(name: str, marker: str) -> None:
    format_name, _, version = marker.rpartition("/")
    if format_name != FORMAT_NAME or not version.isdigit():
        raise ValueError(
            f"checkpoint {name} has unknown format {marker!r}; expected '{FORMAT_NAME}/{FORMAT_VERSION}'"
        )
    if int(version) != FORMAT_VERSION:
        newer = int(version) > FORMAT_VERSION
        raise ValueError(
            f"checkpoint {name} has format version {version}, this reformer-core reads version {FORMAT_VERSION}"
            + ("; upgrade reformer-core to read it" if newer else "")
        )


def _unreadable(name: str, why: str) -> ValueError:
    return ValueError(
        f"{name} is not a readable reformer-core checkpoint ({why}); "
        f"it may be truncated, corrupted, or not a file written by save_checkpoint"
    )


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
        raise _unreadable(name, f"cannot read it: {error}") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise _unreadable(name, "not a .npz (zip) archive; a safetensors checkpoint must be named *.safetensors")
    try:
        with zipfile.ZipFile(name) as archive:
            infos = archive.infolist()
    except _READ_ERRORS as error:
        raise _unreadable(name, f"{type(error).__name__}: {error}") from None
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


# Bounds on what one entry may declare before it is decompressed. The text entries have no
# size in the config: 16 MiB each (save_checkpoint refuses larger metadata). The .npy header
# of an entry is at most _HEADER_BYTES. Parameters must have exactly the config's shapes; an
# optimizer-state leaf may hold at most as many bytes as all parameters at 16 bytes per
# element, and all of them together 8 times that.
_MAX_TEXT_BYTES = 16 * 2**20
_HEADER_BYTES = 64 * 2**10
_MAX_ITEMSIZE = 8  # float64 / int64: the widest dtype a parameter leaf may use
_OPTIMIZER_LEAF_BYTES_PER_PARAM = 16
_OPTIMIZER_TOTAL_FACTOR = 8


def _too_large(name: str, key: str, declared: int, limit: int, why: str) -> ValueError:
    return ValueError(
        f"checkpoint {name}: entry {key}.npy declares {declared} bytes uncompressed, more than the {limit} {why}; "
        f"refused before decompressing it (the file is damaged, or crafted to exhaust memory)"
    )


def _check_sizes(name: str, members: dict, keys: list[str], config: ReformerConfig) -> None:
    """Compare each entry's declared size and .npy header with what ``config`` implies,
    reading only the headers (a few hundred bytes each)."""
    from .._model.lm import param_shapes
    from .._tree import is_shape, tree_paths

    shapes = {_join(_PARAMS, path): tuple(shape) for path, shape in tree_paths(param_shapes(config), is_leaf=is_shape)}
    elements = {key: math.prod(shape) for key, shape in shapes.items()}
    total_elements = sum(elements.values())
    largest = max(elements.values(), default=0)
    optimizer_leaf = _OPTIMIZER_LEAF_BYTES_PER_PARAM * total_elements + _HEADER_BYTES
    optimizer_total = _OPTIMIZER_TOTAL_FACTOR * optimizer_leaf
    optimizer_sum = 0
    for key in keys:
        declared = members[key].declared
        if key in shapes:
            limit = elements[key] * _MAX_ITEMSIZE + _HEADER_BYTES
            why = f"bytes parameter {key} of shape {shapes[key]} can take in any dtype"
        elif key.startswith(_PARAMS + "/"):  # not a parameter of the config: check_params names it later
            limit = largest * _MAX_ITEMSIZE + _HEADER_BYTES
            why = "bytes of the config's largest parameter"
        else:
            limit = optimizer_leaf
            why = (f"bytes an optimizer-state leaf may hold ({_OPTIMIZER_LEAF_BYTES_PER_PARAM} bytes per parameter "
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
        raise _unreadable(name, f"entry {key}.npy: {error}") from None
    except _READ_ERRORS as error:
        raise _unreadable(name, f"entry {key}.npy: {type(error).__name__}: {error}") from None
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
        if key in _SPECIAL_KEYS and members[key].declared > _MAX_TEXT_BYTES + _HEADER_BYTES:
            raise _too_large(name, key, members[key].declared, _MAX_TEXT_BYTES + _HEADER_BYTES,
                             "bytes a text entry may hold")
    out = {}
    try:
        with zipfile.ZipFile(name) as archive:
            for key in keys:
                if key in _SPECIAL_KEYS:
                    _header(name, members, key)  # refuses headers that claim more than the entry holds
                with archive.open(members[key].info) as file:
                    out[key] = np.lib.format.read_array(file, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise _pickled(name) from None
        if str(error).startswith(f"checkpoint {name}") or str(error).startswith(f"{name} is not"):
            raise
        raise _unreadable(name, str(error)) from None
    except _READ_ERRORS as error:
        raise _unreadable(name, f"{type(error).__name__}: {error}") from None
    return out


# What a damaged or foreign zip can raise while numpy reads it (besides ValueError).
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, NotImplementedError, KeyError)


def _text_entry(name: str, arrays: dict, key: str) -> str:
    if key not in arrays:
        raise ValueError(f"checkpoint {name} has no {key} entry; it was not written by save_checkpoint")
    entry = arrays[key]
    if entry.dtype != np.uint8 or entry.ndim != 1:
        raise ValueError(
            f"checkpoint {name}: {key} must be a 1-d uint8 array of UTF-8 text, got {entry.dtype} {entry.shape}"
        )
    try:
        return entry.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"checkpoint {name}: {key} is not UTF-8 text") from None


def _json_entry(name: str, arrays: dict, key: str) -> Any:
    text = _text_entry(name, arrays, key)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {name}: {key} is not valid JSON ({error})") from None


def _check_format(name: str, arrays: dict) -> None:
    if _FORMAT_KEY not in arrays:
        raise ValueError(
            f"{name} has no {_FORMAT_KEY} entry: it is an .npz file, but not a reformer-core checkpoint "
            f"(write checkpoints with reformer_core.save_checkpoint)"
        )
    _check_marker(name, _text_entry(name, arrays, _FORMAT_KEY))


def _stored_config(name: str, arrays: dict) -> ReformerConfig:
    data = _json_entry(name, arrays, _CONFIG_KEY)
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {name}: {_CONFIG_KEY} is not a JSON object")
    try:
        return ReformerConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {name} holds an invalid config: {error}") from None


def _config_difference(name: str, stored: ReformerConfig, given: ReformerConfig) -> str:
    stored_dict, given_dict = stored.to_dict(), given.to_dict()
    fields = [f for f in stored_dict if stored_dict[f] != given_dict[f]]
    listing = "; ".join(f"{f}: file has {stored_dict[f]!r}, given {given_dict[f]!r}" for f in fields)
    return (
        f"checkpoint {name} was saved with a different config ({listing}); "
        f"pass config=None to use the stored one"
    )


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def _leaf_kinds(name: str, structure: Any, key: str, out: dict) -> None:
    """``out[key] = kind`` for every leaf of a stored structure (validating it)."""
    if isinstance(structure, dict):
        for child, sub in structure.items():
            if not child or "/" in child:
                raise ValueError(f"checkpoint {name}: {_STRUCTURE_KEY} has an invalid key {child!r} under {key}")
            _leaf_kinds(name, sub, _join(key, child), out)
    elif isinstance(structure, list):
        for i, sub in enumerate(structure):
            _leaf_kinds(name, sub, _join(key, str(i)), out)
    elif structure in _LEAF_KINDS:
        out[key] = structure
    else:
        raise ValueError(f"checkpoint {name}: {_STRUCTURE_KEY} has an unknown leaf {structure!r} at {key}")


def _rebuild(name: str, structure: Any, key: str, arrays: dict, place) -> Any:
    if isinstance(structure, dict):
        return {child: _rebuild(name, sub, _join(key, child), arrays, place) for child, sub in structure.items()}
    if isinstance(structure, list):
        return [_rebuild(name, sub, _join(key, str(i)), arrays, place) for i, sub in enumerate(structure)]
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

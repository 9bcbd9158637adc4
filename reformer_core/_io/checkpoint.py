"""Checkpoints: parameters, config, optimizer state and metadata in one ``.npz`` or
``.safetensors`` file (chosen by the file's suffix).

This module is the front: :func:`save_checkpoint` and :func:`load_checkpoint`, the choice of
format by suffix, the atomic write, and the placing of the loaded arrays on a backend (with
the ``dtype`` cast). The formats live beside it: the ``.npz`` layout and its validation before
decompression in :mod:`.npz`, the ``.safetensors`` layout in :mod:`.checkpoint_safetensors`;
both name their leaves by the paths of :mod:`.checkpoint_keys` and store the text entries
(format marker, config, metadata) of :mod:`.checkpoint_meta`.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, NamedTuple

import numpy as np

from .._config import ReformerConfig
from .checkpoint_keys import OPTIMIZER, PARAMS, rebuild
from .checkpoint_meta import FORMAT_NAME, FORMAT_VERSION, metadata_json
from .checkpoint_safetensors import load_safetensors, safetensors_writer
from .npz import load_npz_arrays, npz_arrays

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "FORMAT_NAME", "FORMAT_VERSION"]


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
    metadata_text = metadata_json({} if metadata is None else metadata)
    if _is_safetensors(path):
        _write_atomically(os.fspath(path), safetensors_writer(params, config, optimizer_state, metadata_text))
        return

    arrays = npz_arrays(params, config, optimizer_state, metadata_text)
    _write_atomically(os.fspath(path), lambda file: _write_npz(file, arrays))


def _is_safetensors(path) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """Run ``write(file)`` on a temporary file in ``path``'s folder, then move it to ``path``."""
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
            write(file)
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


def _write_npz(file, arrays: dict) -> None:  # looked up at each save (tests replace it)
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
        stored_config, metadata, structure, arrays, widened = load_safetensors(name, config)
    else:
        stored_config, metadata, structure, arrays = load_npz_arrays(name, config)
        widened = set()

    host_params = rebuild(name, structure[PARAMS], PARAMS, arrays, lambda a, key=None: a)
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

    params = rebuild(name, structure[PARAMS], PARAMS, arrays, place)
    optimizer_state = (
        None if structure[OPTIMIZER] is None else rebuild(name, structure[OPTIMIZER], OPTIMIZER, arrays, place)
    )
    return Checkpoint(params=params, config=stored_config, optimizer_state=optimizer_state, metadata=metadata)

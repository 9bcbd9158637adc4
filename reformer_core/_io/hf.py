"""HF transformers Reformer checkpoints: ``from_pretrained`` and ``save_pretrained``.

A folder as ``transformers`` writes it for ``ReformerModelWithLMHead`` (``is_decoder=True``)
or ``ReformerForMaskedLM`` (``is_decoder=False``): ``config.json`` plus ``model.safetensors``
(or ``pytorch_model.bin``, or either one sharded with its ``.index.json``). Loading needs
neither ``transformers`` nor the ``safetensors`` package: ``safetensors.py`` parses the
format, every entry's dtype, shape and byte range checked against the config before any data
is read. ``pytorch_model.bin`` needs torch and is read by the torch adapter with
``torch.load(..., weights_only=True)``, which refuses every pickled object but plain tensors
and containers. The config mapping is ``hf_config.py``.

The weights map onto :func:`reformer_core.init_params`' pytree by renaming and transposing
(HF's ``nn.Linear`` stores ``(out, in)``; the core computes ``x @ W`` with ``(in, out)``),
so a load and a save change no bit. Every HF config field that changes the logits maps to a
``ReformerConfig`` field or is checked: a field or value reformer-core does not implement
raises ``ValueError`` naming it. ``docs/hf.md`` lists the mapping.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any

import numpy as np

from .._config import ReformerConfig
from .hf_config import ARCHITECTURES, NO_EFFECT_FIELDS, config_from_hf, config_to_hf
from .safetensors import read_safetensors, write_safetensors

__all__ = [
    "from_pretrained",
    "save_pretrained",
    "config_from_hf",
    "config_to_hf",
    "hf_state_dict",
    "expected_hf_shapes",
]

# Non-persistent in current transformers, saved by some older versions: accepted when they hold
# the values the core's masks use (-1e9 for masked logits, -1e5 for the self mask).
_MASK_BUFFERS = {"self_mask_value_float16": -1e3, "self_mask_value_float32": -1e5,
                 "mask_value_float16": -1e4, "mask_value_float32": -1e9}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- weight layout


def _hf_layout(config: ReformerConfig, axial: bool) -> list:
    """``(hf_key, rc_path, hf_shape, transpose)`` for every weight, in the pytree's order."""
    d, inner, v = config.d_model, config.num_heads * config.head_dim, config.vocab_size
    out = [("reformer.embeddings.word_embeddings.weight", ("embedding", "tokens"), (v, d), False)]
    if axial:
        for k, (size, width) in enumerate(zip(config.axial_pos_shape, config.axial_dims)):
            hf_shape = tuple(size if a == k else 1 for a in range(len(config.axial_pos_shape))) + (width,)
            out.append((f"reformer.embeddings.position_embeddings.weights.{k}", ("embedding", "axial", k),
                        hf_shape, False))
    else:
        out.append(("reformer.embeddings.position_embeddings.embedding.weight", ("embedding", "axial", 0),
                    (config.axial_pos_shape[0], d), False))
    for i, kind in enumerate(config.attention_layers):
        base = f"reformer.encoder.layers.{i}"
        attention = ("layers", i, "attention")
        feed = ("layers", i, "feed_forward")
        out += [(f"{base}.attention.layer_norm.weight", (*attention, "norm", "scale"), (d,), False),
                (f"{base}.attention.layer_norm.bias", (*attention, "norm", "bias"), (d,), False)]
        names = {"q": "query", "k": "key", "v": "value"} if kind == "local" else {"qk": "query_key", "v": "value"}
        for ours, theirs in names.items():
            out.append((f"{base}.attention.self_attention.{theirs}.weight", (*attention, ours), (inner, d), True))
        out += [
            (f"{base}.attention.output.dense.weight", (*attention, "out"), (d, inner), True),
            (f"{base}.feed_forward.layer_norm.weight", (*feed, "norm", "scale"), (d,), False),
            (f"{base}.feed_forward.layer_norm.bias", (*feed, "norm", "bias"), (d,), False),
            (f"{base}.feed_forward.dense.dense.weight", (*feed, "dense_in", "weight"), (config.d_ff, d), True),
            (f"{base}.feed_forward.dense.dense.bias", (*feed, "dense_in", "bias"), (config.d_ff,), False),
            (f"{base}.feed_forward.output.dense.weight", (*feed, "dense_out", "weight"), (d, config.d_ff), True),
            (f"{base}.feed_forward.output.dense.bias", (*feed, "dense_out", "bias"), (d,), False),
        ]
    out += [("reformer.encoder.layer_norm.weight", ("final_norm", "scale"), (2 * d,), False),
            ("reformer.encoder.layer_norm.bias", ("final_norm", "bias"), (2 * d,), False),
            ("lm_head.decoder.weight", ("output", "weight"), (v, 2 * d), True),
            ("lm_head.decoder.bias", ("output", "bias"), (v,), False)]
    return out


def _set_path(tree: dict, path: tuple, value) -> None:
    node = tree
    for key, following in zip(path[:-1], path[1:]):
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = [] if isinstance(following, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(following, int) else {})
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(None)
    node[path[-1]] = value


def _get_path(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def expected_hf_shapes(config: ReformerConfig, axial: bool) -> dict:
    """HF key -> shape of every weight of ``config`` (``axial``: HF's ``axial_pos_embds``)."""
    shapes = {key: shape for key, _, shape, _ in _hf_layout(config, axial)}
    shapes["lm_head.bias"] = (config.vocab_size,)
    return shapes


def _params_from_state(state: dict, config: ReformerConfig, axial: bool, source: str) -> dict:
    """The core's pytree (host arrays) from an HF state dict of host arrays; checks every key."""
    state = dict(state)
    if "lm_head.decoder.bias" not in state and "lm_head.bias" in state:
        state["lm_head.decoder.bias"] = state["lm_head.bias"]  # older checkpoints tied the two
    state.pop("lm_head.bias", None)  # transformers 5 keeps it apart and never reads it: the decoder's counts
    for key in [k for k in state if k.rsplit(".", 1)[-1] in _MASK_BUFFERS and ".self_attention." in k]:
        value = np.asarray(state.pop(key), dtype=np.float64)
        expected = _MASK_BUFFERS[key.rsplit(".", 1)[-1]]
        if value.shape != () or float(value) != expected:
            raise ValueError(f"{source}: {key} holds {value.tolist()!r}; reformer-core masks with HF's default "
                             f"{expected}")
    layout = _hf_layout(config, axial)
    if not any(k.startswith("reformer.") for k in state) and "embeddings.word_embeddings.weight" in state:
        raise ValueError(f"{source} holds a ReformerModel without a language-model head (no 'reformer.' prefix, no "
                         f"lm_head); reformer-core loads ReformerModelWithLMHead and ReformerForMaskedLM")
    expected = {key for key, *_ in layout}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise ValueError(f"{source} lacks weights the config needs: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        raise ValueError(f"{source} holds weights a {'/'.join(ARCHITECTURES)} with this config does not have: "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    params: dict = {}
    for key, path, shape, transpose in layout:
        array = state[key]
        if tuple(array.shape) != shape:
            raise ValueError(f"{source}: weight {key} has shape {tuple(array.shape)}, but config.json implies {shape}")
        array = array.T if transpose else array.reshape(config.axial_pos_shape[path[2]], -1) \
            if path[:2] == ("embedding", "axial") else array
        _set_path(params, path, np.ascontiguousarray(array))
    return params


def hf_state_dict(params: dict, config: ReformerConfig) -> dict:
    """HF's state dict (host NumPy arrays, bfloat16 widened to float32) of the core's params."""
    from .._model.lm import check_params
    from .._registry import backend_for

    check_params(params, config)
    hf = config_to_hf(config)
    state = {}
    for key, path, shape, transpose in _hf_layout(config, hf["axial_pos_embds"]):
        leaf = _get_path(params, path)
        host = np.asarray(backend_for(leaf).to_numpy(leaf))
        if host.dtype.name == "bfloat16":  # ml_dtypes (JAX): widen exactly
            host = host.astype(np.float32)
        state[key] = np.ascontiguousarray(host.T if transpose else host.reshape(shape))
    state["lm_head.bias"] = state["lm_head.decoder.bias"].copy()  # what transformers 4 tied and 5 keeps apart
    return state


# ---------------------------------------------------------------- reading a folder


def _read_bin(path: pathlib.Path) -> tuple[dict, dict]:
    from .._registry import framework_call

    return framework_call("torch", "read_torch_state_dict", path,
                          needed_for=f"{path}, a torch pickle read with torch.load(..., weights_only=True),",
                          instead="convert the folder to model.safetensors")


def _read_folder(folder: pathlib.Path, expected: dict) -> tuple[dict, dict, str]:
    """``(arrays, dtypes, source)`` of the weights in an HF folder."""
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            break
    else:
        present = sorted(p.name for p in folder.iterdir())
        raise ValueError(f"{folder} holds no weights: expected one of {list(_WEIGHT_FILES)}; found {present}"
                         + (" (TensorFlow/Flax weights are not read: save them with PyTorch first)"
                            if any(p.endswith((".h5", ".msgpack")) for p in present) else ""))
    source = folder / name
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads(source.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{source} is not a shard index (a JSON object with a weight_map): {error}") from None
    else:
        shards = [name]
    arrays, dtypes = {}, {}
    for shard in shards:
        shard_path = folder / shard
        if pathlib.PurePath(shard).name != shard or not shard_path.is_file():
            raise ValueError(f"{source} names a shard {shard!r} that is not a file in {folder}")
        if shard.endswith(".safetensors"):
            part, part_dtypes, metadata = read_safetensors(shard_path, expected=expected)
            if metadata.get("format", "pt") not in ("pt", "np", "numpy"):
                raise ValueError(f"{shard_path} holds {metadata['format']!r} weights; reformer-core reads PyTorch's")
        else:
            part, part_dtypes = _read_bin(shard_path)
        arrays.update(part)
        dtypes.update(part_dtypes)
    return arrays, dtypes, str(source)


def _load_config(folder: pathlib.Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json; an HF model folder holds config.json and its weights")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not JSON: {error}") from None


def _stored_dtype(dtypes: dict) -> str:
    floating = {name for name in dtypes.values() if name in ("float16", "bfloat16", "float32", "float64")}
    if len(floating) == 1:
        return floating.pop()
    for name in ("float64", "float32"):
        if name in floating:
            return name
    return "float32"  # float16 with bfloat16: neither holds the other


def from_pretrained(path, *, backend: Any = None, dtype: Any = None, config_overrides: dict | None = None):
    """``(params, config)`` of a local HF Reformer folder (``save_pretrained``'s output).

    Args:
        path: the folder, holding ``config.json`` and ``model.safetensors`` (or
            ``pytorch_model.bin``, read with ``torch.load(weights_only=True)``; or sharded with
            an ``.index.json``) of a ``ReformerModelWithLMHead`` or ``ReformerForMaskedLM``.
        backend: a backend object or name (default ``get_backend()``).
        dtype: the parameters' dtype (default: the stored one; bfloat16 needs a backend that
            has it, e.g. ``backend="torch"``, or ``dtype="float32"``, which is exact).
        config_overrides: ReformerConfig fields to change after mapping the HF config.

    ``rc.apply(params, tokens, config)`` then returns HF's logits (evaluation mode). With
    ``hash_seed`` in the HF config the rotations are HF's; without, reformer-core's own seeded
    ones (HF draws fresh random rotations at every call then). See ``docs/hf.md``.
    """
    from .._model.lm import parameter_dtype
    from .._registry import resolve_backend
    from .._tree import tree_map

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; from_pretrained reads a local HF model folder (nothing is "
                         f"downloaded)")
    hf = _load_config(folder)
    config = config_from_hf(hf, config_overrides=config_overrides)
    axial = bool(hf.get("axial_pos_embds", True))
    arrays, dtypes, source = _read_folder(folder, expected_hf_shapes(config, axial))
    host = _params_from_state(arrays, config, axial, source)
    backend = resolve_backend(backend)
    stored = _stored_dtype(dtypes)
    try:
        target = parameter_dtype(backend, stored if dtype is None else dtype)
    except TypeError as error:
        if dtype is not None:
            raise
        raise TypeError(f"{source} stores {stored} weights, which backend {backend.name!r} cannot hold ({error}); "
                        f"pass dtype='float32' (exact for bfloat16 and float16) or a backend that has {stored}, "
                        f"e.g. backend='torch'") from None
    return tree_map(lambda a: backend.from_numpy(a, dtype=target), host), config


def _params_dtype_name(params: dict) -> str:
    from .._tree import tree_leaves

    name = str(tree_leaves(params)[0].dtype).rsplit(".", 1)[-1]
    return name if name in ("float16", "bfloat16", "float32", "float64") else "float32"


def save_pretrained(path, params: dict, config: ReformerConfig, *, architecture: str | None = None,
                    extra_config: dict | None = None) -> pathlib.Path:
    """Write an HF folder (``config.json``, ``model.safetensors``) that transformers loads.

    ``transformers.ReformerModelWithLMHead.from_pretrained(path)`` (``ReformerForMaskedLM``
    for a non-causal config) then gives the logits ``rc.apply`` gives (with the same
    rotations: set ``hash_seed`` to compare). Weights keep their dtype and bits.

    Args:
        architecture: ``"ReformerModelWithLMHead"`` or ``"ReformerForMaskedLM"`` (default by
            ``config.causal``).
        extra_config: more ``config.json`` fields that do not change the numbers, e.g.
            ``{"pad_token_id": 0, "eos_token_id": 2}``.

    Raises ValueError for a config HF's Reformer cannot express (``"full"`` layers,
    ``duplicate_correction``, more than two axial axes, ...). Returns the folder.
    """
    hf = config_to_hf(config, architecture=architecture)
    for key, value in (extra_config or {}).items():
        if key not in NO_EFFECT_FIELDS and key not in ("pad_token_id", "eos_token_id", "bos_token_id", "use_cache"):
            raise ValueError(f"extra_config field {key!r} is not written: only fields that change no number "
                             f"(token ids, metadata) may be added; the model's fields come from the config")
        hf[key] = value
    state = hf_state_dict(params, config)
    dtype = _params_dtype_name(params)
    hf["dtype"] = dtype
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", state, dtypes={k: dtype for k in state},
                      metadata={"format": "pt"})
    temporary = folder / f".config.json.{uuid.uuid4().hex}.tmp"
    temporary.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, folder / "config.json")
    return folder

"""HF transformers Reformer checkpoints: ``from_pretrained`` and ``save_pretrained``.

A folder as ``transformers`` writes it for ``ReformerModelWithLMHead`` (``is_decoder=True``)
or ``ReformerForMaskedLM`` (``is_decoder=False``): ``config.json`` plus ``model.safetensors``
(or ``pytorch_model.bin``, or either one sharded with its ``.index.json``). Loading needs
neither ``transformers`` nor the ``safetensors`` package: the safetensors format (an 8-byte
little-endian header length, a JSON header, raw little-endian data) is parsed here, every
entry's dtype, shape and byte range checked against the config before any data is read.
``pytorch_model.bin`` needs torch and is read with ``torch.load(..., weights_only=True)``,
which refuses every pickled object but plain tensors and containers.

The weights map onto :func:`reformer_core.init_params`' pytree by renaming and transposing
(HF's ``nn.Linear`` stores ``(out, in)``; the core computes ``x @ W`` with ``(in, out)``),
so a load and a save change no bit. Every HF config field that changes the logits maps to a
``ReformerConfig`` field or is checked: a field or value reformer-core does not implement
raises ``ValueError`` naming it. ``docs/hf.md`` lists the mapping.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import uuid
from typing import Any

import numpy as np

from .._config import ReformerConfig

__all__ = [
    "from_pretrained",
    "save_pretrained",
    "config_from_hf",
    "config_to_hf",
    "hf_state_dict",
    "expected_hf_shapes",
    "read_safetensors",
    "read_safetensors_header",
    "write_safetensors",
    "write_safetensors_to",
]

ARCHITECTURES = {"ReformerModelWithLMHead": True, "ReformerForMaskedLM": False}  # name -> is_decoder

# HF's ReformerConfig defaults (transformers 5.x; the same since 4.0), used for absent fields.
HF_DEFAULTS = {
    "attention_head_size": 64, "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"],
    "axial_norm_std": 1.0, "axial_pos_embds": True, "axial_pos_shape": [64, 64], "axial_pos_embds_dim": [64, 192],
    "chunk_size_lm_head": 0, "chunk_size_feed_forward": 0, "eos_token_id": 2, "feed_forward_size": 512,
    "hash_seed": None, "hidden_act": "relu", "hidden_dropout_prob": 0.05, "hidden_size": 256,
    "initializer_range": 0.02, "is_decoder": False, "layer_norm_eps": 1e-12, "local_num_chunks_before": 1,
    "local_num_chunks_after": 0, "local_attention_probs_dropout_prob": 0.05, "local_attn_chunk_length": 64,
    "lsh_attn_chunk_length": 64, "lsh_attention_probs_dropout_prob": 0.0, "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0, "max_position_embeddings": 4096, "num_attention_heads": 12, "num_buckets": None,
    "num_hashes": 1, "vocab_size": 320, "tie_word_embeddings": False, "use_cache": True,
    "classifier_dropout": None, "bos_token_id": None, "pad_token_id": 0,
}

# Reformer fields read by config_from_hf (the mapped ones and those checked for a value).
_MAPPED = set(HF_DEFAULTS) | {"num_hidden_layers", "architectures", "model_type"}

# Fields that never change a loaded model's logits: PretrainedConfig's generic ones (4.x and
# 5.x), its old generation defaults, and Reformer fields used only for initialisation, the
# HF-only cache, classification heads or tokens. Any other field raises ValueError.
_NO_EFFECT = {
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "_experts_implementation", "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "tf_legacy_loss", "id2label", "label2id",
    "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "gradient_checkpointing", "output_past",
    # old generation defaults stored in config.json (transformers 4.x)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}
# Generic fields that are harmless only at their default value.
_MUST_BE = {"pruned_heads": ({}, None), "add_cross_attention": (False,), "is_encoder_decoder": (False,),
            "tie_encoder_decoder": (False,), "cross_attention_hidden_size": (None,)}

_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu",
                "swish": "silu"}
_ACTIVATION_TO_HF = {"relu": "relu", "gelu_tanh": "gelu_new", "silu": "silu"}

# Non-persistent in current transformers, saved by some older versions: accepted when they hold
# the values the core's masks use (-1e9 for masked logits, -1e5 for the self mask).
_MASK_BUFFERS = {"self_mask_value_float16": -1e3, "self_mask_value_float32": -1e5,
                 "mask_value_float16": -1e4, "mask_value_float32": -1e9}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- config


def _field(hf: dict, name: str):
    """The HF config's value of ``name``, or HF's default when absent (or null where null means it)."""
    value = hf.get(name, HF_DEFAULTS.get(name))
    return HF_DEFAULTS[name] if value is None and name == "chunk_size_feed_forward" else value


def _int(hf: dict, name: str, minimum: int = 1) -> int:
    value = _field(hf, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"HF config field {name}={value!r} is not supported: reformer-core needs an int >= {minimum}")
    return value


def _rate(hf: dict, name: str) -> float:
    value = _field(hf, name)
    value = 0.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"HF config field {name}={value!r} is not supported: a dropout rate must lie in [0, 1)")
    return float(value)


def _hf_default_buckets(length: int, chunk: int, max_position_embeddings: int):
    """HF's ``LSHSelfAttention._set_num_buckets`` for a sequence of ``length``."""
    power = (2 * (length // chunk)).bit_length() - 1
    limit = 2 * max(int((max_position_embeddings // chunk) ** 0.5), chunk)
    return (2 ** (power // 2), 2 ** (power - power // 2)) if 2**power > limit else 2**power


def _default_buckets_mismatch(chunk: int, max_position_embeddings: int, max_length: int) -> int | None:
    """A length at which HF's and reformer-core's default bucket counts differ, or None.

    HF bounds the unfactorised count with ``max_position_embeddings``, the core with the
    length; they differ only where ``isqrt(max_position_embeddings // chunk) > chunk``. Per
    power of two both choices are monotone in the length, so the ends of each range suffice.
    """
    from .._config import default_num_buckets

    top = min(max_position_embeddings, max_length) // chunk  # lengths chunk * m, m >= 2, are hashed
    if top < 2 or int((max_position_embeddings // chunk) ** 0.5) <= chunk:
        return None
    for power in range(2, (2 * top).bit_length()):
        low, high = max(2, 2 ** (power - 1)), min(top, 2**power - 1)
        for m in (low, high) if low <= high else ():
            length = m * chunk
            if _hf_default_buckets(length, chunk, max_position_embeddings) != default_num_buckets(length, chunk):
                return length
    return None


def config_from_hf(hf: dict, *, config_overrides: dict | None = None) -> ReformerConfig:
    """The :class:`ReformerConfig` of an HF Reformer ``config.json`` (as a dict).

    Raises ValueError naming the field for anything reformer-core does not implement (see
    ``docs/hf.md``). ``config_overrides``: ReformerConfig fields to set afterwards (e.g.
    ``{"attention_dropout": 0.0}`` when HF's LSH and local attention dropout rates differ).
    """
    if not isinstance(hf, dict):
        raise TypeError(f"an HF config must be a dict (the JSON object of config.json), got {type(hf).__name__}")
    if hf.get("model_type", "reformer") != "reformer":
        raise ValueError(f"HF config field model_type={hf['model_type']!r}: only 'reformer' models load here")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or any(name not in ARCHITECTURES for name in architectures):
        raise ValueError(f"HF config field architectures={architectures!r} is not supported: reformer-core loads "
                         f"{' and '.join(ARCHITECTURES)} (a language-model head on every position)")
    unknown = sorted(set(hf) - _MAPPED - _NO_EFFECT - set(_MUST_BE))
    if unknown:
        raise ValueError(f"HF config fields {unknown} are not supported: reformer-core does not know how they "
                         f"change the model (docs/hf.md lists the fields it maps)")
    for name, allowed in _MUST_BE.items():
        if name in hf and hf[name] not in allowed:
            raise ValueError(f"HF config field {name}={hf[name]!r} is not supported (Reformer models have none)")

    kinds = _field(hf, "attn_layers")
    if not isinstance(kinds, (list, tuple)) or not kinds or any(kind not in ("lsh", "local") for kind in kinds):
        raise ValueError(f"HF config field attn_layers={kinds!r} is not supported: give a non-empty list of "
                         f"'lsh' and 'local'")
    kinds = tuple(kinds)
    if "num_hidden_layers" in hf and hf["num_hidden_layers"] != len(kinds):
        raise ValueError(f"HF config field num_hidden_layers={hf['num_hidden_layers']!r} does not match "
                         f"attn_layers ({len(kinds)} layers)")
    causal = _field(hf, "is_decoder")
    if not isinstance(causal, bool):
        raise ValueError(f"HF config field is_decoder={causal!r} is not supported: it must be true or false")
    for name in architectures:
        if ARCHITECTURES[name] != causal:
            raise ValueError(f"HF config field is_decoder={causal} contradicts architectures={architectures!r} "
                             f"({name} needs is_decoder={ARCHITECTURES[name]})")

    d_model, heads, head_dim = _int(hf, "hidden_size"), _int(hf, "num_attention_heads"), _int(hf, "attention_head_size")
    max_position_embeddings = _int(hf, "max_position_embeddings")
    axial = _field(hf, "axial_pos_embds")
    if not isinstance(axial, bool):
        raise ValueError(f"HF config field axial_pos_embds={axial!r} is not supported: it must be true or false")
    if axial:
        shape, dims = _field(hf, "axial_pos_shape"), _field(hf, "axial_pos_embds_dim")
        for name, value in (("axial_pos_shape", shape), ("axial_pos_embds_dim", dims)):
            if not isinstance(value, (list, tuple)) or len(value) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"HF config field {name}={value!r} is not supported: HF's axial position "
                                 f"embedding runs with exactly two positive ints")
        shape, dims = tuple(shape), tuple(dims)
        if sum(dims) != d_model:
            raise ValueError(f"HF config field axial_pos_embds_dim={list(dims)} must sum to hidden_size={d_model}")
        if max_position_embeddings < math.prod(shape):
            raise ValueError(
                f"HF config field max_position_embeddings={max_position_embeddings} is below "
                f"prod(axial_pos_shape)={math.prod(shape)}: reformer-core's length limit is the axial capacity, so "
                f"it would run lengths HF refuses; set max_position_embeddings to {math.prod(shape)}")
    else:
        # HF's learned absolute position embedding is the one-axis axial embedding.
        shape, dims = (max_position_embeddings,), (d_model,)
    max_length = math.prod(shape)

    activation = _field(hf, "hidden_act")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"HF config field hidden_act={activation!r} is not supported: reformer-core implements "
                         f"{sorted(_ACTIVATIONS)} (exact-erf 'gelu' is not in the Array API)")
    eps = _field(hf, "layer_norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"HF config field layer_norm_eps={eps!r} is not supported: it must be a positive float")
    ff_chunk = _field(hf, "chunk_size_feed_forward")
    if isinstance(ff_chunk, bool) or not isinstance(ff_chunk, int) or ff_chunk < 0:
        raise ValueError(f"HF config field chunk_size_feed_forward={ff_chunk!r} is not supported: give an int >= 0")
    lm_chunk = _field(hf, "chunk_size_lm_head")  # chunking the head changes no number: checked, not kept
    if isinstance(lm_chunk, bool) or not isinstance(lm_chunk, int) or lm_chunk < 0:
        raise ValueError(f"HF config field chunk_size_lm_head={lm_chunk!r} is not supported: give an int >= 0")
    hash_seed = _field(hf, "hash_seed")
    if hash_seed is not None and (isinstance(hash_seed, bool) or not isinstance(hash_seed, int)):
        raise ValueError(f"HF config field hash_seed={hash_seed!r} is not supported: give an int or null")
    initializer_range = _field(hf, "initializer_range")
    if isinstance(initializer_range, bool) or not isinstance(initializer_range, (int, float)) or initializer_range <= 0:
        initializer_range = 0.02  # initialisation only; no loaded number depends on it

    values: dict[str, Any] = dict(
        vocab_size=_int(hf, "vocab_size"), d_model=d_model, num_heads=heads, head_dim=head_dim,
        d_ff=_int(hf, "feed_forward_size"), attention_layers=kinds, causal=causal,
        ff_activation=_ACTIVATIONS[activation],
        ff_chunk_length=ff_chunk or None, axial_pos_shape=shape, axial_pos_dims=dims, layer_norm_eps=float(eps),
        hidden_dropout=_rate(hf, "hidden_dropout_prob"), initializer_range=float(initializer_range),
        hash_seed=hash_seed, duplicate_correction=False,
    )
    rates = {}
    if "lsh" in kinds:
        chunk = _int(hf, "lsh_attn_chunk_length")
        values.update(num_hashes=_int(hf, "num_hashes"), lsh_chunk_length=chunk,
                      lsh_num_chunks_before=_int(hf, "lsh_num_chunks_before", 0),
                      lsh_num_chunks_after=_int(hf, "lsh_num_chunks_after", 0))
        buckets = _field(hf, "num_buckets")
        if isinstance(buckets, list):
            buckets = tuple(buckets)
        if buckets is None:
            length = _default_buckets_mismatch(chunk, max_position_embeddings, max_length)
            if length is not None:
                raise ValueError(
                    f"HF config field num_buckets=None is not supported with max_position_embeddings="
                    f"{max_position_embeddings} and lsh_attn_chunk_length={chunk}: HF sizes the default bucket count "
                    f"by max_position_embeddings, reformer-core by the length, and they differ (at length {length}: "
                    f"HF {_hf_default_buckets(length, chunk, max_position_embeddings)!r}); set num_buckets")
        else:
            _check_buckets(buckets)
        values["num_buckets"] = buckets
        rates["lsh_attention_probs_dropout_prob"] = _rate(hf, "lsh_attention_probs_dropout_prob")
    if "local" in kinds:
        values.update(local_chunk_length=_int(hf, "local_attn_chunk_length"),
                      local_num_chunks_before=_int(hf, "local_num_chunks_before", 0),
                      local_num_chunks_after=_int(hf, "local_num_chunks_after", 0))
        rates["local_attention_probs_dropout_prob"] = _rate(hf, "local_attention_probs_dropout_prob")
    overrides = dict(config_overrides or {})
    if len(set(rates.values())) > 1 and "attention_dropout" not in overrides:
        raise ValueError(
            f"HF config fields {', '.join(f'{k}={v}' for k, v in rates.items())} are not supported: reformer-core has "
            f"one attention dropout rate for every layer; choose it with "
            f"config_overrides={{'attention_dropout': rate}} (dropout never acts at inference)")
    values["attention_dropout"] = next(iter(rates.values()))
    try:
        config = ReformerConfig(**values)
        return config.replace(**overrides) if overrides else config
    except (TypeError, ValueError) as error:
        raise ValueError(f"the HF config does not make a valid reformer-core config: {error}") from None


def _check_buckets(buckets) -> None:
    factors = buckets if isinstance(buckets, tuple) else (buckets,)
    if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 2 or f % 2 for f in factors):
        raise ValueError(f"HF config field num_buckets={list(buckets) if isinstance(buckets, tuple) else buckets!r} "
                         f"is not supported: give an even int >= 2, a list of them, or null")


def config_to_hf(config: ReformerConfig, *, architecture: str | None = None) -> dict:
    """The HF ``config.json`` dict of ``config``; ValueError for what HF's Reformer cannot express."""
    if not isinstance(config, ReformerConfig):
        raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
    architecture = architecture or ("ReformerModelWithLMHead" if config.causal else "ReformerForMaskedLM")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    if ARCHITECTURES[architecture] != config.causal:
        raise ValueError(f"{architecture} needs causal={ARCHITECTURES[architecture]}, but the config has "
                         f"causal={config.causal}")
    kinds = config.attention_layers
    if "full" in kinds:
        raise ValueError(f"attention_layers={kinds!r}: HF's Reformer has no 'full' attention layers ('lsh' and "
                         f"'local' only)")
    if config.duplicate_correction:
        raise ValueError("duplicate_correction=True: HF's LSH attention does not subtract log N_ij; save a config "
                         "with duplicate_correction=False")
    if config.causal:
        for name in ("lsh_num_chunks_after", "local_num_chunks_after"):
            if getattr(config, name) and name.split("_")[0] in kinds:
                raise ValueError(f"{name}={getattr(config, name)}: HF's {architecture} requires 0 with a causal model")
    hf: dict[str, Any] = {
        "architectures": [architecture], "model_type": "reformer",
        "attn_layers": list(kinds), "num_hidden_layers": len(kinds), "is_decoder": config.causal,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_attention_heads": config.num_heads,
        "attention_head_size": config.head_dim, "feed_forward_size": config.d_ff,
        "hidden_act": _ACTIVATION_TO_HF[config.ff_activation], "layer_norm_eps": config.layer_norm_eps,
        "chunk_size_feed_forward": config.ff_chunk_length or 0, "chunk_size_lm_head": 0,
        "hidden_dropout_prob": config.hidden_dropout, "lsh_attention_probs_dropout_prob": config.attention_dropout,
        "local_attention_probs_dropout_prob": config.attention_dropout,
        "initializer_range": config.initializer_range, "hash_seed": config.hash_seed,
        "num_hashes": config.num_hashes,
        "num_buckets": list(config.num_buckets) if isinstance(config.num_buckets, tuple) else config.num_buckets,
        "lsh_attn_chunk_length": config.lsh_chunk_length, "lsh_num_chunks_before": config.lsh_num_chunks_before,
        "lsh_num_chunks_after": config.lsh_num_chunks_after, "local_attn_chunk_length": config.local_chunk_length,
        "local_num_chunks_before": config.local_num_chunks_before,
        "local_num_chunks_after": config.local_num_chunks_after, "tie_word_embeddings": False,
    }
    shape, dims = config.axial_pos_shape, config.axial_dims
    if len(shape) == 2:
        hf.update(axial_pos_embds=True, axial_pos_shape=list(shape), axial_pos_embds_dim=list(dims),
                  max_position_embeddings=math.prod(shape))
    elif len(shape) == 1:
        hf.update(axial_pos_embds=False, max_position_embeddings=shape[0])
    else:
        raise ValueError(f"axial_pos_shape={shape}: HF's axial position embedding runs with exactly two axes (one "
                         f"axis saves as a plain position embedding)")
    if "lsh" in kinds and config.num_buckets is None:
        length = _default_buckets_mismatch(config.lsh_chunk_length, hf["max_position_embeddings"], config.max_length)
        if length is not None:
            raise ValueError(f"num_buckets=None: HF would pick another default bucket count than reformer-core (at "
                             f"length {length}), since it sizes it by max_position_embeddings; set num_buckets")
    return hf


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


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path) -> tuple[dict, dict, int]:
    """``(entries, metadata, data_start)`` of a ``.safetensors`` file, reading only its header.

    ``entries[name] = (dtype_tag, shape, begin, end)`` (byte offsets into the data section,
    which starts at ``data_start``). Every entry is validated here, before any data is read:
    a known dtype, a shape of non-negative ints, a byte range inside the file that holds
    exactly ``prod(shape) * itemsize`` bytes, and no two ranges overlapping; the header length
    itself must fit the file and 100 MiB. ``metadata`` (``__metadata__``) must map str to str.
    Anything else raises ValueError naming the file.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        header_length = int.from_bytes(head, "little")
        if header_length > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path} is not a safetensors file (or is truncated): header length {header_length} "
                             f"exceeds the file's {size - 8} remaining bytes"
                             + (f" or the {_MAX_HEADER} bytes a header may take" if header_length > _MAX_HEADER
                                else ""))
        try:
            header = json.loads(f.read(header_length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or any(not isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: its __metadata__ must map names to strings")
    data_start, data_size = 8 + header_length, size - 8 - header_length
    entries = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: header entry {name!r} is malformed: {entry!r}") from None
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}, which reformer-core does not read")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and not isinstance(begin, bool)
                and not isinstance(end, bool) and 0 <= begin <= end <= data_size):
            raise ValueError(f"{path}: tensor {name!r} has an invalid shape {shape} or byte range [{begin}, {end}) "
                             f"(data holds {data_size} bytes; the file is truncated, damaged or crafted)")
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
            raise ValueError(f"{path}: tensor {name!r} of dtype {dtype} and shape {shape} needs "
                             f"{math.prod(shape) * _ST_DTYPES[dtype].itemsize} bytes, its range holds {end - begin}")
        entries[name] = (dtype, shape, begin, end)
    ranges = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, first_end, first), (second_begin, _, second) in zip(ranges, ranges[1:]):
        if second_begin < first_end:
            raise ValueError(f"{path}: tensors {first!r} and {second!r} have overlapping byte ranges; the file is "
                             f"damaged or crafted")
    return entries, metadata, data_start


def read_safetensors(path, *, expected: dict | None = None, validate=None) -> tuple[dict, dict, dict]:
    """``(arrays, dtypes, metadata)`` of a ``.safetensors`` file, parsed without the package.

    The header is validated first (:func:`read_safetensors_header`): every entry's dtype,
    shape and byte range must be consistent, inside the file and not overlapping; when
    ``expected`` (name -> shape) is given, each named entry's shape must match; and
    ``validate(entries, metadata)``, when given, may raise for anything else -- all before any
    data is read (then entry by entry). bfloat16 entries come back as exact float32 with
    ``dtypes[name] == "bfloat16"``.
    """
    path = pathlib.Path(path)
    entries, metadata, data_start = read_safetensors_header(path)
    for name, (dtype, shape, _, _) in entries.items():
        if expected is not None and name in expected and shape != tuple(expected[name]):
            raise ValueError(f"{path}: weight {name} has shape {shape}, but config.json implies "
                             f"{tuple(expected[name])}")
    if validate is not None:
        validate(entries, metadata)
    arrays, dtypes = {}, {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, _) in entries.items():
            f.seek(data_start + begin)
            raw = np.fromfile(f, dtype=_ST_DTYPES[dtype], count=math.prod(shape))
            if raw.size != math.prod(shape):
                raise ValueError(f"{path}: tensor {name!r} is truncated (the file changed while it was read)")
            raw = raw.reshape(shape)
            if dtype == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
                dtypes[name] = "bfloat16"
            else:
                raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
                dtypes[name] = raw.dtype.name
            arrays[name] = raw
    return arrays, dtypes, metadata


_WRITE_TAGS = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
               np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
               np.dtype("?"): "BOOL"}


def write_safetensors_to(file, arrays: dict, *, dtypes: dict | None = None, metadata: dict | None = None) -> None:
    """Write host arrays in the safetensors format to an open binary ``file`` (see
    :func:`write_safetensors`)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name], order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if (dtypes or {}).get(name) == "bfloat16":
            bits = np.asarray(array, dtype="<f4").view("<u4")
            if np.any(bits & 0xFFFF):
                raise ValueError(f"tensor {name!r} holds values that are not bfloat16 numbers; cast it first")
            data, tag = (bits >> 16).astype("<u2").tobytes(), "BF16"
        else:
            little = array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.itemsize > 1 else array
            if little.dtype not in _WRITE_TAGS:
                raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which is not written here")
            data, tag = little.tobytes(), _WRITE_TAGS[little.dtype]
        header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    file.write(len(text).to_bytes(8, "little"))
    file.write(text)
    for blob in blobs:
        file.write(blob)


def write_safetensors(path, arrays: dict, *, dtypes: dict | None = None, metadata: dict | None = None) -> None:
    """Write host arrays as a ``.safetensors`` file (atomically: a temporary file, then rename).

    ``dtypes[name] == "bfloat16"`` stores a float32 array as bfloat16; its values must be
    exact bfloat16 numbers (ValueError otherwise: nothing is rounded silently).
    """
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as f:
            write_safetensors_to(f, arrays, dtypes=dtypes, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


# ---------------------------------------------------------------- reading a folder


def _read_bin(path: pathlib.Path) -> tuple[dict, dict]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a torch pickle, read with torch.load(..., weights_only=True): install torch "
                          f"(pip install 'reformer-core[torch]'), or convert the folder to model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it, "
                         f"so it holds other pickled objects (never unpickled here): {str(error).splitlines()[0]}") \
            from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} cannot be read as a torch state dict: {error}") from None
    if not isinstance(state, dict):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict (a dict of tensors)")
    arrays, dtypes = {}, {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; a state dict maps "
                            f"names to tensors")
        value = value.detach()
        dtypes[key] = str(value.dtype).rsplit(".", 1)[-1]
        arrays[key] = (value.to(torch.float32) if value.dtype == torch.bfloat16 else value).numpy()
    return arrays, dtypes


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
        if key not in _NO_EFFECT and key not in ("pad_token_id", "eos_token_id", "bos_token_id", "use_cache"):
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

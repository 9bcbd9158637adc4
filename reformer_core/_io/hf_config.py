"""HF Reformer ``config.json`` <-> :class:`ReformerConfig`: every field that changes the logits
maps to a ReformerConfig field or is checked, and a field or value reformer-core does not
implement raises ``ValueError`` naming it (``docs/hf.md`` lists the mapping)."""

from __future__ import annotations

import math
from typing import Any

from .._config import ReformerConfig

__all__ = ["ARCHITECTURES", "HF_DEFAULTS", "NO_EFFECT_FIELDS", "config_from_hf", "config_to_hf"]

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
NO_EFFECT_FIELDS = {
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
    unknown = sorted(set(hf) - _MAPPED - NO_EFFECT_FIELDS - set(_MUST_BE))
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

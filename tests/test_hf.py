"""HF transformers Reformer checkpoints: import and export parity, round trips, bad input.

Small random HF models are built with ``transformers`` (nothing downloads), saved to a
temporary folder and loaded with ``reformer_core.from_pretrained``; the logits must match
HF's (eval mode): <= 1e-10 relative in float64 and <= 1e-5 in float32. Tests that need
``transformers`` or ``torch`` skip without them; the format and config checks do not.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from unittest import mock

import numpy as np
import pytest

import reformer_core as rc
from reformer_core._io import hf as hf_io
from reformer_core._io import safetensors as st_io

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRANSFORMERS = HAS_TORCH and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install 'reformer-core[torch]')")
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers (and torch) are not installed; see "
                                                          "requirements-ci.txt")

VOCAB = 37


def _hf():
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    return torch, transformers


def hf_config(**changes):
    _, transformers = _hf()
    values = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                  feed_forward_size=24, axial_pos_shape=[8, 8], axial_pos_embds_dim=[6, 10],
                  max_position_embeddings=64, lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=4,
                  num_hashes=2, is_decoder=True, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                  local_attention_probs_dropout_prob=0.0, attn_layers=["lsh", "local"], hash_seed=3)
    values.update(changes)
    return transformers.ReformerConfig(**values)


def hf_model(folder, *, dtype="float64", seed=0, **changes):
    """A random HF model (weights spread wider than HF's init), saved to ``folder``; in eval mode."""
    torch, transformers = _hf()
    config = hf_config(**changes)
    cls = transformers.ReformerModelWithLMHead if config.is_decoder else transformers.ReformerForMaskedLM
    torch.manual_seed(seed)
    model = cls(config).eval().to(getattr(torch, dtype))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        model.lm_head.bias.copy_(model.lm_head.decoder.bias)  # tied in transformers 4, unused in 5
    model.save_pretrained(folder)
    return model


def tokens_for(length, batch=2, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def hf_logits(model, tokens, attention_mask=None):
    torch, _ = _hf()
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
        return model(torch.as_tensor(tokens), attention_mask=mask).logits.double().numpy()


def relative_error(ours, theirs, keep=None):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if keep is not None:
        ours, theirs = ours[keep], theirs[keep]
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


# ---------------------------------------------------------------- import parity

FLOAT64_CASES = {
    "local-only": dict(attn_layers=["local", "local"], hash_seed=None),
    "lsh-only": dict(attn_layers=["lsh", "lsh"]),
    "mixed": dict(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=3, hash_seed=11),
    "factorised-buckets": dict(attn_layers=["lsh", "local"], num_buckets=[2, 4]),
    "default-buckets": dict(attn_layers=["lsh", "lsh"], num_buckets=None),
    "masked-lm": dict(attn_layers=["lsh", "local"], is_decoder=False, lsh_num_chunks_after=1,
                      local_num_chunks_after=1, lsh_num_chunks_before=2),
    "chunked-feed-forward": dict(attn_layers=["local", "lsh"], chunk_size_feed_forward=4),
    "gelu-and-plain-positions": dict(attn_layers=["lsh", "local"], hidden_act="gelu_new", axial_pos_embds=False),
}


@needs_hf
@pytest.mark.parametrize("case", sorted(FLOAT64_CASES))
def test_imported_logits_equal_hfs_in_float64(tmp_path, case):
    model = hf_model(tmp_path, **FLOAT64_CASES[case])
    params, config = rc.from_pretrained(tmp_path, backend="numpy")
    assert str(params["embedding"]["tokens"].dtype) == "float64"  # the stored dtype
    tokens = tokens_for(64 if case == "default-buckets" else 32)
    error = relative_error(rc.apply(params, tokens, config), hf_logits(model, tokens))
    print(f"{case}: float64 relative error {error:.2e}")
    assert error <= 1e-10


@needs_hf
def test_padding_masks_and_hfs_automatic_padding_match(tmp_path):
    model = hf_model(tmp_path, attn_layers=["lsh", "local", "lsh"])
    params, config = rc.from_pretrained(tmp_path)
    tokens = tokens_for(32)
    mask = np.ones((2, 32), dtype=bool)
    mask[1, 19:] = False
    error = relative_error(rc.apply(params, tokens, config, attention_mask=mask), hf_logits(model, tokens, mask),
                           keep=mask)
    print(f"padding mask: float64 relative error {error:.2e}")
    assert error <= 1e-10
    # HF pads a length that is not a multiple of the chunk itself (pad_token_id, masked);
    # reformer-core asks for the padding: the real positions agree.
    short = tokens_for(27, seed=4)
    padded, keep = rc.pad_to_multiple(short, 8)
    ours = np.asarray(rc.apply(params, padded, config, attention_mask=keep))[:, :27]
    error = relative_error(ours, hf_logits(model, short))
    print(f"HF auto-padding: float64 relative error {error:.2e}")
    assert error <= 1e-10
    with pytest.raises(ValueError, match="multiple of lsh_chunk_length"):
        rc.apply(params, short, config)


@needs_hf
def test_without_hash_seed_hfs_rotations_can_be_passed_explicitly(tmp_path):
    torch, _ = _hf()
    model = hf_model(tmp_path, attn_layers=["lsh", "local", "lsh"], hash_seed=None)
    params, config = rc.from_pretrained(tmp_path)
    assert config.hash_seed is None
    tokens = tokens_for(32)
    torch.manual_seed(123)  # HF draws each LSH layer's rotations from the global generator, in order
    theirs = hf_logits(model, tokens)
    torch.manual_seed(123)
    shape = (config.num_heads, config.head_dim, config.num_hashes, config.num_buckets // 2)
    rotations = [torch.randn(shape, dtype=torch.float64).numpy() if kind == "lsh" else None
                 for kind in config.attention_layers]
    assert relative_error(rc.apply(params, tokens, config, rotations=rotations), theirs) <= 1e-10
    # reformer-core's own rotations are others: the logits differ
    assert relative_error(rc.apply(params, tokens, config), theirs) > 1e-6


FLOAT32_CASES = {
    "local-only": dict(attn_layers=["local", "local"], hash_seed=None),
    "lsh-only": dict(attn_layers=["lsh", "lsh"], num_hashes=1),
    "mixed": dict(attn_layers=["local", "lsh", "lsh"], num_hashes=1),
    "factorised-buckets": dict(attn_layers=["lsh", "local"], num_buckets=[2, 4], num_hashes=1),
}


@needs_hf
@pytest.mark.parametrize("case", sorted(FLOAT32_CASES))
def test_imported_logits_equal_hfs_in_float32(tmp_path, case):
    model = hf_model(tmp_path, dtype="float32", **FLOAT32_CASES[case])
    params, config = rc.from_pretrained(tmp_path)
    assert str(params["embedding"]["tokens"].dtype) == "float32"
    tokens = tokens_for(32)
    mask = np.ones((2, 32), dtype=bool)
    mask[0, 25:] = False
    error = relative_error(rc.apply(params, tokens, config, attention_mask=mask), hf_logits(model, tokens, mask),
                           keep=mask)
    print(f"{case}: float32 relative error {error:.2e}")
    assert error <= 1e-5


@needs_hf
def test_several_hash_rounds_in_float32_are_within_1e5_of_the_float64_result(tmp_path):
    """With several rounds HF combines them as ``exp(z - logsumexp(z))``; where a token can
    only attend to itself ``z`` is about -1e5, whose float32 spacing (0.008) puts up to ~0.4%
    into HF's float32 weights. reformer-core normalises explicitly, so the fair comparison is
    with HF in float64 hashing with the same (float32-drawn) rotations."""
    torch, transformers = _hf()
    model32 = hf_model(tmp_path, dtype="float32", attn_layers=["lsh", "local", "lsh"], num_hashes=2)
    params, config = rc.from_pretrained(tmp_path)
    tokens = tokens_for(32)
    model64 = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path, dtype=torch.float64).eval()
    randn = torch.randn

    def float32_draw(*args, dtype=None, **kwargs):  # HF's draw in float32, then widened
        return randn(*args, dtype=torch.float32, **kwargs).to(dtype)

    with mock.patch.object(torch, "randn", float32_draw):
        truth = hf_logits(model64, tokens)
    ours = relative_error(rc.apply(params, tokens, config), truth)
    theirs = relative_error(hf_logits(model32, tokens), truth)
    print(f"2 rounds, float32 against float64: reformer-core {ours:.2e}, HF {theirs:.2e}")
    assert ours <= 1e-5


@needs_hf
def test_hash_seed_rotations_are_hfs_draw_for_every_lsh_layer(tmp_path):
    torch, _ = _hf()
    config = rc.ReformerConfig(vocab_size=8, d_model=8, num_heads=2, head_dim=4, d_ff=8, num_hashes=3,
                               attention_layers=("lsh", "local", "lsh"), num_buckets=(2, 4), lsh_chunk_length=4,
                               local_chunk_length=4, axial_pos_shape=(4, 4), hash_seed=42)
    for dtype in ("float32", "float64"):
        like = np.zeros((1,), dtype=dtype)
        rotations = rc.sample_rotations(config, 16, seed=7, like=like)
        torch.manual_seed(42)
        expected = torch.randn((2, 4, 3, 3), dtype=getattr(torch, dtype)).numpy()
        assert rotations[1] is None
        for entry in (rotations[0], rotations[2]):
            assert entry.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(entry, expected)
        # the seed does not matter: hash_seed fixes the rotations, as in HF
        np.testing.assert_array_equal(rc.sample_rotations(config, 16, seed=8, like=like)[0], expected)
    bf16 = rc.sample_rotations(config, 16, 0, like=torch.zeros(1, dtype=torch.bfloat16))[0]
    torch.manual_seed(42)
    assert torch.equal(bf16, torch.randn((2, 4, 3, 3), dtype=torch.bfloat16))


def test_hash_seed_without_torch_names_the_fix(monkeypatch):
    config = rc.ReformerConfig(vocab_size=8, d_model=8, num_heads=2, head_dim=4, d_ff=8, num_buckets=4,
                               attention_layers=("lsh",), lsh_chunk_length=4, axial_pos_shape=(4, 4), hash_seed=1)
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    with pytest.raises(ImportError, match=r"install torch .*hash_seed=None"):
        rc.sample_rotations(config, 16, 0, like=np.zeros(1, dtype=np.float32))


def test_hash_seed_is_validated():
    with pytest.raises(TypeError, match="hash_seed"):
        rc.ReformerConfig(vocab_size=8, hash_seed=True)
    with pytest.raises(TypeError, match="hash_seed"):
        rc.ReformerConfig(vocab_size=8, hash_seed=1.0)
    with pytest.raises(ValueError, match="hash_seed"):
        rc.ReformerConfig(vocab_size=8, hash_seed=2**64)
    config = rc.ReformerConfig(vocab_size=8, hash_seed=5)
    assert rc.ReformerConfig.from_dict(config.to_dict()) == config
    assert rc.ReformerConfig(vocab_size=8).hash_seed is None


# ---------------------------------------------------------------- export and round trips


@needs_hf
@pytest.mark.parametrize("causal", [True, False], ids=["lm-head", "masked-lm"])
def test_exported_folders_load_into_transformers_with_the_same_logits(tmp_path, causal):
    torch, transformers = _hf()
    config = rc.ReformerConfig(vocab_size=VOCAB, d_model=16, num_heads=2, head_dim=8, d_ff=24, num_hashes=2,
                               attention_layers=("local", "lsh", "lsh"), num_buckets=(2, 4), lsh_chunk_length=8,
                               local_chunk_length=8, axial_pos_shape=(8, 8), axial_pos_dims=(4, 12), causal=causal,
                               lsh_num_chunks_after=0 if causal else 1, ff_activation="gelu_tanh",
                               ff_chunk_length=8, hash_seed=9, initializer_range=0.3)
    params = rc.init_params(config, seed=3, dtype="float64")
    # transformers creates the axial position weights in float32 whatever the model's dtype, so its
    # from_pretrained rounds float64 ones: give them float32 values, to compare in float64.
    params["embedding"]["axial"] = [a.astype(np.float32).astype(np.float64) for a in params["embedding"]["axial"]]
    rc.save_pretrained(tmp_path, params, config, extra_config={"pad_token_id": 0, "eos_token_id": 2})
    cls = transformers.ReformerModelWithLMHead if causal else transformers.ReformerForMaskedLM
    model = cls.from_pretrained(tmp_path).eval()
    assert model.dtype == torch.float64
    tokens = tokens_for(32)
    error = relative_error(rc.apply(params, tokens, config), hf_logits(model, tokens))
    print(f"export ({'lm-head' if causal else 'masked-lm'}): float64 relative error {error:.2e}")
    assert error <= 1e-10
    again, loaded = rc.from_pretrained(tmp_path)
    assert loaded == config
    for a, b in zip(rc.tree_leaves(params), rc.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


@needs_hf
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_hf_to_reformer_core_to_hf_changes_no_weight(tmp_path, dtype):
    torch, transformers = _hf()
    model = hf_model(tmp_path / "hf", dtype=dtype, attn_layers=["local", "lsh"], num_buckets=[2, 4])
    backend = "torch" if dtype == "bfloat16" else "numpy"  # NumPy has no bfloat16
    params, config = rc.from_pretrained(tmp_path / "hf", backend=backend)
    rc.save_pretrained(tmp_path / "rc", params, config)
    # (transformers loads axial position weights as float32 whatever the checkpoint holds: compare
    # what it loads from both folders)
    first = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "hf").eval()
    back = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "rc").eval()
    before, after = first.state_dict(), back.state_dict()
    assert sorted(before) == sorted(after) == sorted(model.state_dict())
    assert back.dtype == getattr(torch, dtype)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    # and the files' tensors are bit-identical too
    ours, ours_dtypes, _ = st_io.read_safetensors(tmp_path / "rc" / "model.safetensors")
    theirs, theirs_dtypes, _ = st_io.read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert ours_dtypes == theirs_dtypes
    for key in theirs:
        assert ours[key].tobytes() == theirs[key].tobytes(), key


@needs_hf
def test_pytorch_model_bin_and_shards_load_like_safetensors(tmp_path):
    torch, _ = _hf()
    model = hf_model(tmp_path / "st", attn_layers=["lsh", "local"])
    reference, config = rc.from_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for folder in ("bin", "sharded"):
        params, loaded = rc.from_pretrained(tmp_path / folder)
        assert loaded == config
        for a, b in zip(rc.tree_leaves(reference), rc.tree_leaves(params)):
            np.testing.assert_array_equal(a, b)


@needs_hf
def test_reformer_lm_from_pretrained_gives_hfs_logits(tmp_path):
    torch, _ = _hf()
    from reformer_core.backends.torch import ReformerLM

    model = hf_model(tmp_path, attn_layers=["local", "lsh"])
    lm = ReformerLM.from_pretrained(tmp_path)
    assert not lm.training and lm.config.hash_seed == 3
    assert lm.params.get_parameter("embedding.tokens").dtype == torch.float64
    tokens = tokens_for(32)
    with torch.no_grad():
        ours = lm(torch.as_tensor(tokens)).numpy()
    assert relative_error(ours, hf_logits(model, tokens)) <= 1e-10
    lm32 = ReformerLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert lm32.params.get_parameter("embedding.tokens").dtype == torch.float32


# ---------------------------------------------------------------- bad input


def _write_folder(folder, config: dict, weights: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        st_io.write_safetensors(folder / "model.safetensors", weights, metadata={"format": "pt"})
    return folder


def _small_hf_dict(**changes):
    values = dict(architectures=["ReformerModelWithLMHead"], model_type="reformer", vocab_size=VOCAB,
                  hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=24,
                  axial_pos_shape=[8, 8], axial_pos_embds_dim=[6, 10], max_position_embeddings=64,
                  lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=4, num_hashes=2, is_decoder=True,
                  attn_layers=["lsh", "local"], lsh_attention_probs_dropout_prob=0.0,
                  local_attention_probs_dropout_prob=0.0)
    values.update(changes)
    return values


def _weights_for(hf: dict) -> dict:
    config = hf_io.config_from_hf(hf)
    rng = np.random.default_rng(0)
    return {key: rng.standard_normal(shape).astype(np.float32)
            for key, shape in hf_io.expected_hf_shapes(config, hf.get("axial_pos_embds", True)).items()}


def test_a_folder_without_weights_or_config_is_refused(tmp_path):
    _write_folder(tmp_path / "empty", _small_hf_dict())
    with pytest.raises(ValueError, match=r"holds no weights: expected one of .*model\.safetensors"):
        rc.from_pretrained(tmp_path / "empty")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        rc.from_pretrained(tmp_path / "noconfig")
    with pytest.raises(ValueError, match="is not a folder"):
        rc.from_pretrained(tmp_path / "missing")


def test_a_numpy_only_load_needs_neither_torch_nor_transformers(tmp_path):
    hf = _small_hf_dict(hash_seed=None)
    weights = _weights_for(hf)
    folder = _write_folder(tmp_path / "m", hf, weights)
    params, config = rc.from_pretrained(folder)
    np.testing.assert_array_equal(params["layers"][0]["attention"]["qk"],
                                  weights["reformer.encoder.layers.0.attention.self_attention.query_key.weight"].T)
    np.testing.assert_array_equal(params["embedding"]["axial"][1],
                                  weights["reformer.embeddings.position_embeddings.weights.1"][0])
    assert config.attention_layers == ("lsh", "local") and config.causal and config.hidden_dropout == 0.05
    # older transformers saved the mask constants as buffers: accepted when they hold HF's values
    buffer = "reformer.encoder.layers.0.attention.self_attention.self_mask_value_float32"
    _write_folder(folder, hf, {**weights, buffer: np.asarray(-1e5, dtype=np.float32)})
    rc.from_pretrained(folder)
    _write_folder(folder, hf, {**weights, buffer: np.asarray(-1e4, dtype=np.float32)})
    with pytest.raises(ValueError, match="self_mask_value_float32 holds -10000.0"):
        rc.from_pretrained(folder)


@pytest.mark.parametrize("changes, match", [
    ({"foo_bar": 1}, r"fields \['foo_bar'\] are not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
    ({"attn_layers": ["lsh", "full"]}, "attn_layers"),
    ({"axial_pos_shape": [4, 4, 4], "axial_pos_embds_dim": [4, 4, 8]}, "axial_pos_shape"),
    ({"max_position_embeddings": 32}, "max_position_embeddings=32 is below"),
    ({"num_buckets": 5}, "num_buckets=5"),
    ({"num_buckets": None, "max_position_embeddings": 2**16, "axial_pos_shape": [256, 256],
      "lsh_attn_chunk_length": 4, "local_attn_chunk_length": 4}, "num_buckets=None is not supported"),
    ({"is_decoder": False}, "contradicts architectures"),
    ({"architectures": ["ReformerForSequenceClassification"]}, "architectures"),
    ({"model_type": "bert"}, "model_type"),
    ({"local_attention_probs_dropout_prob": 0.05}, "one attention dropout rate"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"hash_seed": "7"}, "hash_seed"),
])
def test_unsupported_config_fields_and_values_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        hf_io.config_from_hf(_small_hf_dict(**changes))


def test_config_mapping_and_overrides():
    config = hf_io.config_from_hf(_small_hf_dict(local_attention_probs_dropout_prob=0.05, chunk_size_feed_forward=4,
                                                 hidden_act="swish", hash_seed=4, eos_token_id=2, pad_token_id=0,
                                                 tie_word_embeddings=True, max_length=20, num_buckets=[2, 4]),
                                  config_overrides={"attention_dropout": 0.0})
    assert (config.ff_chunk_length, config.ff_activation) == (4, "silu")
    assert (config.hash_seed, config.num_buckets) == (4, (2, 4))
    assert config.attention_dropout == 0.0 and config.axial_pos_dims == (6, 10)
    plain = hf_io.config_from_hf(_small_hf_dict(axial_pos_embds=False))
    assert plain.axial_pos_shape == (64,) and plain.axial_pos_dims == (16,)
    # the published models' setting: num_buckets given, HF's and reformer-core's defaults never asked
    assert hf_io.config_from_hf(_small_hf_dict(num_buckets=None)).num_buckets is None


def test_mismatched_weight_shapes_are_refused(tmp_path):
    hf = _small_hf_dict()
    weights = _weights_for(hf)
    folder = _write_folder(tmp_path / "m", {**hf, "feed_forward_size": 32}, weights)
    with pytest.raises(ValueError, match=r"feed_forward\.dense\.dense\.(weight|bias) has shape \(24.*implies \(32"):
        rc.from_pretrained(folder)
    del weights["reformer.encoder.layer_norm.bias"]
    folder = _write_folder(tmp_path / "n", hf, weights)
    with pytest.raises(ValueError, match=r"lacks weights .*reformer\.encoder\.layer_norm\.bias"):
        rc.from_pretrained(folder)
    folder = _write_folder(tmp_path / "o", hf, {**_weights_for(hf), "classifier.dense.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="classifier.dense.weight"):
        rc.from_pretrained(folder)


class _NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


@needs_torch
def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path, capsys):
    import torch

    hf = _small_hf_dict()
    folder = _write_folder(tmp_path / "m", hf)
    state = {k: torch.from_numpy(v) for k, v in _weights_for(hf).items()}
    torch.save({**state, "evil": _NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        rc.from_pretrained(folder)
    assert "must never run" not in capsys.readouterr().out
    torch.save({**state, "step": 3}, folder / "pytorch_model.bin")
    with pytest.raises(TypeError, match="'step' is a int, not a tensor"):
        rc.from_pretrained(folder)
    torch.save([1, 2], folder / "pytorch_model.bin")
    with pytest.raises(TypeError, match="not a state dict"):
        rc.from_pretrained(folder)


def test_damaged_safetensors_files_are_refused(tmp_path):
    hf = _small_hf_dict()
    folder = _write_folder(tmp_path / "m", hf, _weights_for(hf))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="invalid shape|byte range"):
        rc.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        rc.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        rc.from_pretrained(folder)


def test_safetensors_writer_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5).astype(np.float32),
              "c": rng.standard_normal((2, 2)).astype(np.float16),
              "d": (rng.standard_normal(6).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)}
    st_io.write_safetensors(tmp_path / "x.safetensors", arrays, dtypes={"d": "bfloat16"}, metadata={"format": "pt"})
    back, dtypes, metadata = st_io.read_safetensors(tmp_path / "x.safetensors")
    assert dtypes == {"a": "float64", "b": "float32", "c": "float16", "d": "bfloat16"} and metadata == {"format": "pt"}
    for key in arrays:
        np.testing.assert_array_equal(back[key], arrays[key])
    with pytest.raises(ValueError, match="not bfloat16 numbers"):
        st_io.write_safetensors(tmp_path / "y.safetensors", {"d": np.full(2, math.pi, np.float32)},
                                dtypes={"d": "bfloat16"})


def test_save_pretrained_refuses_what_hf_cannot_express(tmp_path):
    base = dict(vocab_size=8, d_model=8, num_heads=2, head_dim=4, d_ff=8, num_buckets=4, lsh_chunk_length=4,
                local_chunk_length=4, axial_pos_shape=(4, 4))
    for changes, match in [({"attention_layers": ("lsh", "full")}, "no 'full' attention"),
                           ({"duplicate_correction": True, "num_hashes": 2}, "duplicate_correction"),
                           ({"axial_pos_shape": (2, 2, 4)}, "exactly two axes"),
                           ({"lsh_num_chunks_after": 1}, "lsh_num_chunks_after=1")]:
        config = rc.ReformerConfig(**{**base, **changes})
        with pytest.raises(ValueError, match=match):
            rc.save_pretrained(tmp_path, rc.init_params(config), config)
    config = rc.ReformerConfig(**base)
    with pytest.raises(ValueError, match="num_hashes"):
        rc.save_pretrained(tmp_path, rc.init_params(config), config, extra_config={"num_hashes": 4})
    with pytest.raises(ValueError, match="ReformerForMaskedLM needs causal=False"):
        rc.save_pretrained(tmp_path, rc.init_params(config), config, architecture="ReformerForMaskedLM")
    with pytest.raises(ValueError, match="has shape"):
        rc.save_pretrained(tmp_path, rc.init_params(config.replace(d_ff=16)), config)

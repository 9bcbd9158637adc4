"""``reformer-core generate`` and ``reformer-core convert``: output equal to rc.generate,
streaming, conversions with identical logits, and exit status 2 with CLI advice on bad input."""

from __future__ import annotations

import builtins
import importlib.util
import warnings

import numpy as np
import pytest

import reformer_core as rc
from reformer_core import cli
from reformer_core._io.tokenizers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("restore_backend")

CONFIG = rc.ReformerConfig(vocab_size=258, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                           attention_layers=("local", "lsh"), num_buckets=4, lsh_chunk_length=8,
                           local_chunk_length=8, axial_pos_shape=(4, 8))
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers and torch")


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.npz"
    params = rc.init_params(CONFIG, seed=3)
    rc.save_checkpoint(path, params, CONFIG)
    return path, params


def expected_text(params, config, prompt: str, n: int, **options) -> str:
    tokenizer = ByteTokenizer()
    ids = np.asarray([tokenizer.encode(prompt)])
    out = np.asarray(rc.generate(params, config, ids, n, **options))
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_greedy_and_sampled_output_equal_rc_generate(checkpoint, capsys):
    path, params = checkpoint
    status, out, _ = run_cli(capsys, "generate", "--checkpoint", str(path), "--prompt", "Hi there",
                             "--max-new-tokens", "12", "--temperature", "0")
    assert status == 0
    assert out == expected_text(params, CONFIG, "Hi there", 12, temperature=0) + "\n"
    status, out, _ = run_cli(capsys, "generate", "--checkpoint", str(path), "--prompt", "Hi", "--max-new-tokens",
                             "10", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "7")
    assert status == 0
    assert out == expected_text(params, CONFIG, "Hi", 10, temperature=0.8, top_k=40, top_p=0.9, seed=7) + "\n"


def test_on_token_streams_every_step_in_order(checkpoint):
    _, params = checkpoint
    seen = []
    prompt = np.asarray([[40, 41, 42], [50, 51, 52]])
    out = np.asarray(rc.generate(params, CONFIG, prompt, 6, temperature=0, on_token=seen.append))
    assert len(seen) == 6 and all(s.shape == (2,) for s in seen)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 3:])
    with pytest.raises(TypeError, match="on_token must be a callable"):
        rc.generate(params, CONFIG, prompt, 2, on_token=3)


def test_cli_writes_and_flushes_each_piece_before_generation_ends(checkpoint, monkeypatch):
    path, _ = checkpoint
    events = []

    class Recorder:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush",))

    from reformer_core._model import generate as generate_module

    real_generate = generate_module.generate

    def wrapped(*args, **kwargs):
        result = real_generate(*args, **kwargs)
        events.append(("returned",))
        return result

    monkeypatch.setattr(generate_module, "generate", wrapped)
    monkeypatch.setattr("sys.stdout", Recorder())
    assert cli.main(["generate", "--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    returned = events.index(("returned",))
    streamed = events[:returned]
    assert [e[0] for e in streamed] == ["write", "flush"] * 5  # one piece per token, each flushed at once
    assert events[returned + 1:] == [("write", "\n"), ("flush",)]


def test_bad_inputs_exit_2_with_cli_advice(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    status, _, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "missing.npz"), "--prompt", "a",
                             "--max-new-tokens", "3")
    assert status == 2 and "--checkpoint" in err and "no such file" in err
    for argv in (["--checkpoint", str(path), "--pretrained", str(tmp_path)], []):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", *argv, "--prompt", "a", "--max-new-tokens", "3"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--checkpoint" in err and "--pretrained" in err
    status, _, err = run_cli(capsys, "generate", "--checkpoint", str(path), "--prompt", "x" * 40, "--max-new-tokens",
                             "1")
    assert status == 2 and "longer than the model's maximum length of 32" in err and "shorten --prompt" in err
    status, _, err = run_cli(capsys, "generate", "--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens",
                             "40")
    assert status == 2 and "at most 29 new tokens" in err and "lower --max-new-tokens" in err
    status, _, err = run_cli(capsys, "generate", "--checkpoint", str(path), "--prompt", "", "--max-new-tokens", "3")
    assert status == 2 and "--prompt is empty" in err
    status, _, err = run_cli(capsys, "generate", "--pretrained", str(path), "--prompt", "a", "--max-new-tokens", "3")
    assert status == 2 and "use --checkpoint" in err
    small = tmp_path / "small.safetensors"
    small_config = CONFIG.replace(vocab_size=64)
    rc.save_checkpoint(small, rc.init_params(small_config, seed=0), small_config)
    status, _, err = run_cli(capsys, "generate", "--checkpoint", str(small), "--prompt", "z", "--max-new-tokens", "3")
    assert status == 2 and "258 ids" in err and "--tokenizer" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--checkpoint", str(path), "--prompt", "a", "--max-new-tokens", "3", "--top-p", "2"])
    assert "(0, 1]" in capsys.readouterr().err


def test_convert_between_checkpoint_formats_keeps_every_bit(checkpoint, tmp_path, capsys):
    path, params = checkpoint
    target = tmp_path / "tiny.safetensors"
    assert run_cli(capsys, "convert", str(path), str(target))[0] == 0
    loaded = rc.load_checkpoint(target)
    tokens = np.arange(32)[None, :] % 258
    np.testing.assert_array_equal(rc.apply(loaded.params, tokens, CONFIG), rc.apply(params, tokens, CONFIG))
    status, _, err = run_cli(capsys, "convert", str(path), str(target))
    assert status == 2 and "--force" in err
    status, _, err = run_cli(capsys, "convert", str(tmp_path / "nothing.npz"), str(tmp_path / "out.npz"))
    assert status == 2 and "SRC" in err and "does not exist" in err


# ---------------------------------------------------------------- HF folders


def hf_folder(folder, **changes):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    values = dict(vocab_size=258, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                  feed_forward_size=24, axial_pos_shape=[4, 8], axial_pos_embds_dim=[6, 10],
                  max_position_embeddings=32, lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=4,
                  num_hashes=2, is_decoder=True, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                  local_attention_probs_dropout_prob=0.0, attn_layers=["local", "lsh"], hash_seed=3)
    values.update(changes)
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**values)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        model.lm_head.bias.copy_(model.lm_head.decoder.bias)
    model.save_pretrained(folder)
    return model


@needs_transformers
def test_generate_from_an_hf_folder_and_its_conversion(tmp_path, capsys):
    folder = tmp_path / "hf"
    hf_folder(folder)
    params, config = rc.from_pretrained(folder)
    want = expected_text(params, config, "The ", 9, temperature=0)
    status, out, _ = run_cli(capsys, "generate", "--pretrained", str(folder), "--prompt", "The ",
                             "--max-new-tokens", "9", "--temperature", "0")
    assert status == 0 and out == want + "\n"
    converted = tmp_path / "converted.safetensors"
    assert run_cli(capsys, "convert", str(folder), str(converted))[0] == 0
    status, out, _ = run_cli(capsys, "generate", "--checkpoint", str(converted), "--prompt", "The ",
                             "--max-new-tokens", "9", "--temperature", "0")
    assert status == 0 and out == want + "\n"


@needs_transformers
def test_convert_both_ways_gives_identical_logits(tmp_path, capsys):
    import torch
    import transformers

    folder = tmp_path / "hf"
    model = hf_folder(folder)
    tokens = np.random.default_rng(0).integers(0, 258, (2, 32))
    params, config = rc.from_pretrained(folder)
    reference = np.asarray(rc.apply(params, tokens, config))
    for name in ("m.npz", "m.safetensors"):
        assert run_cli(capsys, "convert", str(folder), str(tmp_path / name))[0] == 0
        loaded = rc.load_checkpoint(tmp_path / name)
        assert loaded.config == config
        np.testing.assert_array_equal(np.asarray(rc.apply(loaded.params, tokens, loaded.config)), reference)
    back = tmp_path / "back"
    assert run_cli(capsys, "convert", str(tmp_path / "m.safetensors"), str(back))[0] == 0
    again, again_config = rc.from_pretrained(back)
    np.testing.assert_array_equal(np.asarray(rc.apply(again, tokens, again_config)), reference)
    exported = transformers.ReformerModelWithLMHead.from_pretrained(back).eval()
    with torch.no_grad():
        ours = exported(torch.as_tensor(tokens)).logits.numpy()
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_array_equal(ours, theirs)  # the exported folder is HF's model, bit for bit


@needs_transformers
def test_sentencepiece_tokenizer_in_the_pretrained_folder(tmp_path, capsys, monkeypatch):
    import string

    import transformers

    folder = tmp_path / "hf"
    hf_folder(folder)
    vocab = {"<unk>": 0, "</s>": 1}
    for ch in "\u2581" + string.ascii_lowercase:
        vocab[ch] = len(vocab)
    transformers.ReformerTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    tokenizer = transformers.ReformerTokenizer.from_pretrained(folder)
    params, config = rc.from_pretrained(folder)
    ids = tokenizer.encode("ab c", add_special_tokens=False)
    out = np.asarray(rc.generate(params, config, np.asarray([ids]), 6, temperature=0))
    want = tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    status, text, err = run_cli(capsys, "generate", "--pretrained", str(folder), "--prompt", "ab c",
                                "--max-new-tokens", "6", "--temperature", "0")
    assert status == 0, err
    assert text == want + "\n"
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    status, _, err = run_cli(capsys, "generate", "--pretrained", str(folder), "--prompt", "ab",
                             "--max-new-tokens", "2", "--temperature", "0")
    assert status == 2 and "install transformers" in err and "--tokenizer bytes" in err

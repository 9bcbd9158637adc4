"""Checkpoints: one .npz per save, exact round trips, clear errors for every bad file."""

from __future__ import annotations

import io
import json
import os
import zipfile

import array_api_strict as xs
import numpy as np
import pytest

import reformer_core as rc
import reformer_core._io.checkpoint as checkpoint_module
from reformer_core import tree_map, tree_paths

pytestmark = pytest.mark.usefixtures("restore_backend")

DEVICE1 = xs.Device("device1")


def host_leaves(tree) -> dict:
    return {path: np.asarray(leaf) for path, leaf in tree_paths(tree)}


def assert_same_params(loaded, original) -> None:
    expected = host_leaves(original)
    got = host_leaves(loaded)
    assert got.keys() == expected.keys()
    for path in expected:
        assert got[path].dtype == expected[path].dtype, path
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)


def rewrite_npz(source, target, *, drop=(), replace=None) -> None:
    """Copy a checkpoint's entries into a new .npz, dropping or replacing some."""
    with np.load(source, allow_pickle=False) as archive:
        entries = {key: archive[key] for key in archive.files if key not in drop}
    entries.update(replace or {})
    np.savez(target, **entries)


@pytest.fixture
def saved(tmp_path, tiny_config):
    path = tmp_path / "model.npz"
    params = rc.init_params(tiny_config, seed=3, backend="numpy")
    rc.save_checkpoint(path, params, tiny_config)
    return path


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact(tmp_path, tiny_config, dtype):
    params = rc.init_params(tiny_config, seed=1, backend="numpy", dtype=dtype)
    optimizer_state = {
        "step": 17,
        "learning_rate": 3e-4,
        "use_nesterov": False,
        "schedule": None,
        "moments": {"first": tree_map(np.zeros_like, params), "second": [np.arange(3, dtype=np.int32)]},
    }
    metadata = {"epoch": 2, "loss": 1.25, "note": "hello", "tags": ["a", "b"]}
    path = tmp_path / "ckpt.npz"
    rc.save_checkpoint(path, params, tiny_config, optimizer_state=optimizer_state, metadata=metadata)

    loaded = rc.load_checkpoint(path, backend="numpy")
    assert isinstance(loaded, checkpoint_module.Checkpoint)
    assert loaded.config == tiny_config
    assert loaded.metadata == metadata
    assert_same_params(loaded.params, params)
    assert all(leaf.dtype == np.dtype(dtype) for _, leaf in tree_paths(loaded.params))
    state = loaded.optimizer_state
    assert state["step"] == 17 and type(state["step"]) is int
    assert state["learning_rate"] == 3e-4 and type(state["learning_rate"]) is float
    assert state["use_nesterov"] is False and state["schedule"] is None
    assert_same_params(state["moments"]["first"], optimizer_state["moments"]["first"])
    assert state["moments"]["second"][0].dtype == np.int32
    np.testing.assert_array_equal(state["moments"]["second"][0], [0, 1, 2])


def test_defaults_no_optimizer_state_and_empty_metadata(saved, tiny_config):
    loaded = rc.load_checkpoint(saved, config=tiny_config)
    assert loaded.optimizer_state is None
    assert loaded.metadata == {}
    assert loaded.config == tiny_config


def test_file_is_a_plain_npz_without_pickles(saved):
    with np.load(saved, allow_pickle=False) as archive:
        files = set(archive.files)
        marker = archive["__format__"].tobytes().decode()
        config = json.loads(archive["__config__"].tobytes().decode())
    assert marker == "reformer-core-checkpoint/1"
    assert {"__config__", "__metadata__", "__structure__", "params/layers/0/attention/qk"} <= files
    assert config["vocab_size"] == 16


def test_load_casts_floating_leaves_only_when_asked(tmp_path, tiny_config):
    params = rc.init_params(tiny_config, backend="numpy", dtype="float64")
    path = tmp_path / "ckpt.npz"
    rc.save_checkpoint(path, params, tiny_config, optimizer_state={"count": np.int64(3), "m": params["output"]})
    loaded = rc.load_checkpoint(path, backend="numpy", dtype="float32")
    assert {leaf.dtype for _, leaf in tree_paths(loaded.params)} == {np.dtype("float32")}
    assert loaded.optimizer_state["m"]["weight"].dtype == np.float32
    assert loaded.optimizer_state["count"].dtype == np.int64


def test_load_onto_strict_device1(saved):
    loaded = rc.load_checkpoint(saved, backend="strict:device1")
    for path, leaf in tree_paths(loaded.params):
        assert type(leaf).__module__.startswith("array_api_strict"), path
        assert leaf.device == DEVICE1, path
        assert leaf.dtype == xs.float32


def test_load_uses_the_current_backend_by_default(saved):
    with rc.use_backend("strict", device="device1"):
        loaded = rc.load_checkpoint(saved)
    leaf = loaded.params["output"]["weight"]
    assert leaf.device == DEVICE1


def test_save_params_from_strict_backend(tmp_path, tiny_config):
    params = rc.init_params(tiny_config, seed=5, backend="strict:device1")
    state = {"step": 1, "m": params["final_norm"]}
    path = tmp_path / "strict.npz"
    rc.save_checkpoint(path, params, tiny_config, optimizer_state=state)
    loaded = rc.load_checkpoint(path, backend="numpy")
    reference = rc.init_params(tiny_config, seed=5, backend="numpy")
    assert_same_params(loaded.params, reference)
    np.testing.assert_array_equal(loaded.optimizer_state["m"]["scale"], reference["final_norm"]["scale"])


# ---------------------------------------------------------------- writing


def test_atomic_write_leaves_no_temp_files(tmp_path, tiny_config):
    params = rc.init_params(tiny_config, backend="numpy")
    path = tmp_path / "model.npz"
    rc.save_checkpoint(path, params, tiny_config)
    rc.save_checkpoint(path, params, tiny_config, metadata={"again": True})  # overwrite in place
    assert os.listdir(tmp_path) == ["model.npz"]
    assert rc.load_checkpoint(path).metadata == {"again": True}


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, tiny_config, monkeypatch):
    params = rc.init_params(tiny_config, backend="numpy")
    path = tmp_path / "model.npz"
    rc.save_checkpoint(path, params, tiny_config, metadata={"version": 1})

    def broken(file, arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write_npz", broken)
    with pytest.raises(OSError, match="disk full"):
        rc.save_checkpoint(path, params, tiny_config, metadata={"version": 2})
    assert os.listdir(tmp_path) == ["model.npz"]
    monkeypatch.undo()
    assert rc.load_checkpoint(path).metadata == {"version": 1}


def test_bfloat16_is_refused_not_converted(tmp_path, tiny_config):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    params = rc.init_params(tiny_config, backend="numpy")
    state = {"m": params["output"]["bias"].astype(ml_dtypes.bfloat16)}
    with pytest.raises(TypeError, match="float32"):
        rc.save_checkpoint(tmp_path / "bf16.npz", params, tiny_config, optimizer_state=state)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "state, match",
    [
        ({"pair": (1, 2)}, "tuple"),
        ({"name": "adam"}, "str"),
        ({3: np.zeros(2)}, "keys"),
        ({"a/b": np.zeros(2)}, "keys"),
    ],
)
def test_unsupported_optimizer_state_leaves(tmp_path, tiny_config, state, match):
    params = rc.init_params(tiny_config, backend="numpy")
    with pytest.raises(TypeError, match=match):
        rc.save_checkpoint(tmp_path / "x.npz", params, tiny_config, optimizer_state=state)


def test_metadata_must_be_json(tmp_path, tiny_config):
    params = rc.init_params(tiny_config, backend="numpy")
    with pytest.raises(TypeError, match="metadata"):
        rc.save_checkpoint(tmp_path / "x.npz", params, tiny_config, metadata={"array": np.zeros(2)})
    with pytest.raises(TypeError, match="metadata"):
        rc.save_checkpoint(tmp_path / "x.npz", params, tiny_config, metadata={"pair": (1, 2)})


def test_save_checks_params_against_config(tmp_path, tiny_config):
    params = rc.init_params(tiny_config, backend="numpy")
    with pytest.raises(ValueError, match="shape"):
        rc.save_checkpoint(tmp_path / "x.npz", params, tiny_config.replace(vocab_size=32))


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rc.load_checkpoint(tmp_path / "nope.npz")


def test_config_mismatch_names_the_field(saved, tiny_config):
    with pytest.raises(ValueError, match="d_ff") as error:
        rc.load_checkpoint(saved, config=tiny_config.replace(d_ff=32))
    assert "num_hashes" not in str(error.value)
    assert str(saved) in str(error.value)


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 3):
        broken = tmp_path / f"cut{cut}.npz"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable reformer-core checkpoint") as error:
            rc.load_checkpoint(broken)
        assert str(broken) in str(error.value)


def test_corrupted_bytes_inside(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        info = archive.getinfo("params/output/weight.npy")
    middle = info.header_offset + 30 + len(info.filename) + 200  # inside that member's data
    data[middle] ^= 0xFF
    broken = tmp_path / "flipped.npz"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable reformer-core checkpoint"):
        rc.load_checkpoint(broken)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable reformer-core checkpoint"):
        rc.load_checkpoint(path)


def test_plain_npy_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match="not a readable reformer-core checkpoint"):
        rc.load_checkpoint(path)


def test_pickled_object_array_is_refused(saved, tmp_path):
    path = tmp_path / "pickled.npz"
    rewrite_npz(saved, path, replace={"optimizer/evil": np.array([{"a": 1}, None], dtype=object)})
    with pytest.raises(ValueError, match="pickled"):
        rc.load_checkpoint(path)


def test_npz_without_format_marker(saved, tmp_path):
    path = tmp_path / "foreign.npz"
    rewrite_npz(saved, path, drop=("__format__",))
    with pytest.raises(ValueError, match="__format__"):
        rc.load_checkpoint(path)


def test_unknown_format_version(saved, tmp_path):
    path = tmp_path / "future.npz"
    marker = np.frombuffer(b"reformer-core-checkpoint/99", dtype=np.uint8)
    rewrite_npz(saved, path, replace={"__format__": marker})
    with pytest.raises(ValueError, match="version 99"):
        rc.load_checkpoint(path)


def test_missing_leaf(saved, tmp_path):
    path = tmp_path / "missing.npz"
    rewrite_npz(saved, path, drop=("params/layers/1/attention/v",))
    with pytest.raises(ValueError, match="missing leaves.*params/layers/1/attention/v"):
        rc.load_checkpoint(path)


def test_extra_leaf(saved, tmp_path):
    path = tmp_path / "extra.npz"
    rewrite_npz(saved, path, replace={"params/layers/0/attention/bonus": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected entries.*bonus"):
        rc.load_checkpoint(path)


def test_wrong_shape_leaf(saved, tmp_path):
    path = tmp_path / "shape.npz"
    rewrite_npz(saved, path, replace={"params/output/bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="params/output/bias|output/bias") as error:
        rc.load_checkpoint(path)
    assert "shape" in str(error.value) and str(path) in str(error.value)


def test_structure_not_matching_config(tmp_path, tiny_config):
    # A file whose stored config says three layers while the params hold two.
    params = rc.init_params(tiny_config, backend="numpy")
    good = tmp_path / "good.npz"
    rc.save_checkpoint(good, params, tiny_config)
    bigger = tiny_config.replace(attention_layers=("lsh", "local", "lsh"))
    config_json = np.frombuffer(json.dumps(bigger.to_dict()).encode(), dtype=np.uint8)
    path = tmp_path / "structure.npz"
    rewrite_npz(good, path, replace={"__config__": config_json})
    with pytest.raises(ValueError, match="structure"):
        rc.load_checkpoint(path)


def test_paths_are_str_or_pathlike(saved):
    assert rc.load_checkpoint(str(saved)).config == rc.load_checkpoint(saved).config
    with pytest.raises(TypeError):
        rc.load_checkpoint(io.BytesIO(saved.read_bytes()))

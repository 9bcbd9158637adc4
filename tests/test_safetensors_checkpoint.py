"""safetensors checkpoints: exact round trips (bfloat16 included), .npz still loads, every bad
file refused before its data is read, and ReformerLM with safetensors.torch.save_model."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest

import reformer_core as rc
from reformer_core import tree_paths
from reformer_core._io import safetensors as st_io

pytestmark = pytest.mark.usefixtures("restore_backend")

CONFIG = rc.ReformerConfig(vocab_size=16, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                           attention_layers=("local", "lsh"), num_buckets=4, lsh_chunk_length=8,
                           local_chunk_length=8, axial_pos_shape=(4, 8))


def host(tree) -> dict:
    out = {}
    for path, leaf in tree_paths(tree):
        if hasattr(leaf, "detach"):  # torch: keep the bits (bfloat16 viewed as int16)
            import torch

            leaf = leaf.detach().cpu()
            out[path] = (str(leaf.dtype), leaf.view(torch.int16).numpy() if leaf.dtype == torch.bfloat16
                         else leaf.numpy())
        else:
            array = np.asarray(leaf)
            out[path] = (str(array.dtype), array.view(np.uint16) if array.dtype.name == "bfloat16" else array)
    return out


def assert_identical(a, b) -> None:
    a, b = host(a), host(b)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path][0] == b[path][0], path
        np.testing.assert_array_equal(a[path][1], b[path][1], err_msg=path)


def header_of(path) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path, header: dict, data: bytes, *, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(text) if length is None else length).to_bytes(8, "little"))
        f.write(text)
        f.write(data)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_round_trip_with_optimizer_state_and_step(tmp_path, dtype):
    params = rc.init_params(CONFIG, seed=1, dtype=dtype)
    optimizer = rc.Adam(learning_rate=1e-3)
    state = optimizer.init(params)
    state["step"] = 12
    state["extra"] = {"loss": 2.5, "best": float("inf"), "done": True, "nothing": None}
    path = tmp_path / "model.safetensors"
    rc.save_checkpoint(path, params, CONFIG, optimizer_state=state, metadata={"step": 12, "note": "ok"})
    loaded = rc.load_checkpoint(path)
    assert loaded.config == CONFIG and loaded.metadata == {"step": 12, "note": "ok"}
    assert_identical(loaded.params, params)
    assert loaded.optimizer_state["step"] == 12 and isinstance(loaded.optimizer_state["step"], int)
    assert loaded.optimizer_state["extra"] == {"loss": 2.5, "best": float("inf"), "done": True, "nothing": None}
    assert_identical(loaded.optimizer_state["m"], state["m"])
    # the header holds the config, metadata and the step as JSON (string values only)
    header, _ = header_of(path)
    meta = header["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["config"]) == CONFIG.to_dict() and json.loads(meta["scalars"])["optimizer/step"] == 12
    assert meta["format"] == "pt" and meta["reformer_core"] == "reformer-core-checkpoint/1"
    # the safetensors package reads it too
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    np.testing.assert_array_equal(safetensors_numpy.load_file(path)["params/output/weight"],
                                  np.asarray(params["output"]["weight"]))


def test_torch_bfloat16_round_trips_bit_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    params = rc.init_params(CONFIG, seed=2, backend="torch", dtype="bfloat16")
    state = rc.Adam(learning_rate=1e-3).init(params)
    path = tmp_path / "bf16.safetensors"
    rc.save_checkpoint(path, params, CONFIG, optimizer_state=state)
    loaded = rc.load_checkpoint(path, backend="torch")
    assert loaded.params["embedding"]["tokens"].dtype == torch.bfloat16
    assert_identical(loaded.params, params)
    header, _ = header_of(path)
    assert header["params/embedding/tokens"]["dtype"] == "BF16"
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["params/output/weight"], params["output"]["weight"])
    with pytest.raises(TypeError, match="bfloat16.*dtype='float32'"):
        rc.load_checkpoint(path)  # numpy has no bfloat16
    widened = rc.load_checkpoint(path, dtype="float32")
    np.testing.assert_array_equal(widened.params["output"]["weight"], params["output"]["weight"].float().numpy())
    with pytest.raises(TypeError, match="bfloat16.*safetensors"):
        rc.save_checkpoint(tmp_path / "bf16.npz", params, CONFIG)  # .npz keeps refusing it


def test_jax_bfloat16_round_trips_bit_exactly(tmp_path):
    pytest.importorskip("jax")
    params = rc.init_params(CONFIG, seed=3, backend="jax", dtype="bfloat16")
    path = tmp_path / "jax.safetensors"
    rc.save_checkpoint(path, params, CONFIG)
    loaded = rc.load_checkpoint(path, backend="jax")
    assert str(loaded.params["output"]["weight"].dtype) == "bfloat16"
    assert_identical(loaded.params, params)


def test_npz_still_loads_and_formats_convert(tmp_path):
    params = rc.init_params(CONFIG, seed=4)
    rc.save_checkpoint(tmp_path / "a.npz", params, CONFIG, metadata={"k": [1, 2]})
    old = rc.load_checkpoint(tmp_path / "a.npz")
    rc.save_checkpoint(tmp_path / "a.safetensors", old.params, old.config, metadata=old.metadata)
    new = rc.load_checkpoint(tmp_path / "a.safetensors")
    assert new.metadata == {"k": [1, 2]}
    assert_identical(new.params, params)
    with pytest.raises(ValueError, match="named \\*.safetensors"):
        rc.load_checkpoint(_copy(tmp_path / "a.safetensors", tmp_path / "renamed.npz"))


def _copy(source, target):
    target.write_bytes(source.read_bytes())
    return target


@pytest.fixture
def saved(tmp_path):
    params = rc.init_params(CONFIG, seed=5)
    state = rc.Adam(learning_rate=1e-3).init(params)
    path = tmp_path / "good.safetensors"
    rc.save_checkpoint(path, params, CONFIG, optimizer_state=state)
    return path


@pytest.fixture
def no_data_read():
    """Fail the test if read_safetensors reaches the data (np.fromfile)."""
    with mock.patch.object(st_io.np, "fromfile", side_effect=AssertionError("data was read")) as patched:
        yield patched


def test_truncated_file_is_refused_before_reading_data(saved, no_data_read):
    raw = saved.read_bytes()
    saved.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated|byte range"):
        rc.load_checkpoint(saved)
    saved.write_bytes(raw[:5])
    with pytest.raises(ValueError, match="shorter than its 8-byte header length"):
        rc.load_checkpoint(saved)


def test_huge_declared_header_length_is_refused(saved, no_data_read):
    header, data = header_of(saved)
    write_raw(saved, header, data, length=2**62)
    with pytest.raises(ValueError, match="header length"):
        rc.load_checkpoint(saved)


def test_header_lying_about_sizes_is_refused(saved, no_data_read):
    header, data = header_of(saved)
    entry = header["params/output/weight"]
    entry["shape"] = [entry["shape"][0], entry["shape"][1] * 2]  # claims twice the bytes its range holds
    write_raw(saved, header, data)
    with pytest.raises(ValueError, match="needs .* bytes, its range holds"):
        rc.load_checkpoint(saved)


def test_overlapping_offsets_are_refused(saved, no_data_read):
    header, data = header_of(saved)
    a, b = header["params/output/weight"], header["params/output/bias"]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    write_raw(saved, header, data)
    with pytest.raises(ValueError, match="overlapping byte ranges"):
        rc.load_checkpoint(saved)


def test_out_of_range_offsets_are_refused(saved, no_data_read):
    header, data = header_of(saved)
    entry = header["params/output/bias"]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + size]
    write_raw(saved, header, data)
    with pytest.raises(ValueError, match="invalid shape .* or byte range"):
        rc.load_checkpoint(saved)


def test_wrong_shapes_against_the_config_are_refused(saved):
    header, data = header_of(saved)
    header["__metadata__"]["config"] = json.dumps(CONFIG.replace(d_ff=48).to_dict())  # needs other shapes
    write_raw(saved, header, data)
    with mock.patch.object(st_io.np, "fromfile", side_effect=AssertionError("data was read")):
        with pytest.raises(ValueError, match="has shape .* but the stored config needs"):
            rc.load_checkpoint(saved)


def test_oversized_optimizer_leaf_and_foreign_files_are_refused(saved, tmp_path, no_data_read):
    header, data = header_of(saved)
    entry = header["optimizer/m/output/bias"]
    count = 10**9
    entry.update(shape=[count], data_offsets=[0, 4 * count])
    write_raw(saved, header, data)
    with pytest.raises(ValueError, match="invalid shape|byte range|optimizer-state leaf"):
        rc.load_checkpoint(saved)
    foreign = tmp_path / "foreign.safetensors"
    write_raw(foreign, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0\0\0")
    with pytest.raises(ValueError, match="not a reformer-core checkpoint"):
        rc.load_checkpoint(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\0\0\0\0\0\0\0not json at all!")
    with pytest.raises(ValueError, match="not JSON"):
        rc.load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError):
        rc.load_checkpoint(tmp_path / "missing.safetensors")


def test_missing_tensor_is_refused(saved, no_data_read):
    header, data = header_of(saved)
    del header["params/output/bias"]
    write_raw(saved, header, data)
    with pytest.raises(ValueError, match="missing tensors"):
        rc.load_checkpoint(saved)


def test_reformer_lm_saves_with_safetensors_torch_save_model(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from reformer_core.backends.torch.nn import ReformerLM

    model = ReformerLM(CONFIG, seed=3)
    model(torch.zeros(1, 16, dtype=torch.int64)).sum().backward()  # advance the step counter
    path = tmp_path / "module.safetensors"
    safetensors_torch.save_model(model, os.fspath(path))
    other = ReformerLM(CONFIG, seed=0)
    missing, unexpected = safetensors_torch.load_model(other, os.fspath(path))
    assert not missing and not unexpected
    assert (other.seed, other.rotations_seed, other.step) == (3, 3, 1)
    tokens = torch.randint(0, 16, (2, 16))
    model.eval(), other.eval()
    assert torch.equal(model(tokens), other(tokens))
    # load_state_dict round trips keep working, including state dicts from before (dict extra state)
    third = ReformerLM(CONFIG, seed=9)
    third.load_state_dict(model.state_dict())
    assert (third.seed, third.step) == (3, 1)
    old = dict(model.state_dict())
    old["_extra_state"] = {"seed": 4, "rotations_seed": 5, "step": 6}
    third.load_state_dict(old)
    assert (third.seed, third.rotations_seed, third.step) == (4, 5, 6)
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())


def test_optimizer_state_beyond_its_bound_is_refused_before_reading(tmp_path):
    params = rc.init_params(CONFIG, seed=7)
    elements = sum(int(np.asarray(leaf).size) for _, leaf in tree_paths(params))
    path = tmp_path / "big.safetensors"
    rc.save_checkpoint(path, params, CONFIG, optimizer_state={"big": np.zeros(4 * elements + 1, np.float32)})
    with mock.patch.object(st_io.np, "fromfile", side_effect=AssertionError("data was read")):
        with pytest.raises(ValueError, match="optimizer-state leaf may hold"):
            rc.load_checkpoint(path)

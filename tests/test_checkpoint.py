"""Native format: model.json + state_dict.pt round trip, and every way the weights can be bad."""
import os
import pickle

import pytest
import torch

from graph.config import LlamaConfig
from utils.checkpoint import (CheckpointError, atomic_path, expected_shapes, load_native,
                              load_torch_file, save_native)


def tiny_config(**changes):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    return LlamaConfig(**{**base, **changes})


def random_state_dict(config, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(dtype)
            for name, shape in expected_shapes(config).items()}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path, tie, dtype):
    config = tiny_config(tie_word_embeddings=tie, torch_dtype=str(dtype).removeprefix("torch."))
    sd = random_state_dict(config, dtype)
    save_native(str(tmp_path), config, sd, extra_json={"source": {"a": 1}})
    loaded_config, loaded = load_native(str(tmp_path))
    assert loaded_config == config
    assert ("output.weight" in loaded) is not tie
    assert loaded.keys() == sd.keys()
    for name, t in sd.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t), name
    assert sorted(os.listdir(tmp_path)) == ["model.json", "state_dict.pt"]


def test_fused_shapes_follow_gqa_and_head_dim():
    shapes = expected_shapes(tiny_config(head_dim=8, num_key_value_heads=1))
    assert shapes["layers.0.attention.wqkv.weight"] == ((4 + 2 * 1) * 8, 16)
    assert shapes["layers.1.attention.wo.weight"] == (16, 32)
    assert shapes["layers.1.feed_forward.w13.weight"] == (48, 16)


def test_save_refuses_wrong_shape_missing_and_extra(tmp_path):
    config = tiny_config()
    sd = random_state_dict(config)
    bad = {**sd, "layers.1.feed_forward.w2.weight": torch.zeros(16, 23)}
    with pytest.raises(CheckpointError, match=r"'layers.1.feed_forward.w2.weight' has shape \(16, 23\)"):
        save_native(str(tmp_path), config, bad)
    with pytest.raises(CheckpointError, match="'norm.weight' is missing"):
        save_native(str(tmp_path), config, {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(CheckpointError, match="unexpected weight 'extra.bias'"):
        save_native(str(tmp_path), config, {**sd, "extra.bias": torch.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_load_shape_mismatch_names_the_tensor(tmp_path):
    config = tiny_config()
    save_native(str(tmp_path), config, random_state_dict(config))
    # claim a wider FFN than the weights have
    data = (tmp_path / "model.json").read_text().replace('"intermediate_size": 24', '"intermediate_size": 32')
    (tmp_path / "model.json").write_text(data)
    with pytest.raises(CheckpointError, match=r"'layers.0.feed_forward.w13.weight' has shape \(48, 16\).*\(64, 16\)"):
        load_native(str(tmp_path))


def test_load_missing_dir_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_native(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="holds no native checkpoint"):
        load_native(str(tmp_path))


@pytest.fixture
def saved(tmp_path):
    config = tiny_config()
    save_native(str(tmp_path), config, random_state_dict(config))
    return tmp_path / "state_dict.pt"


def test_empty_weights_file(saved):
    saved.write_bytes(b"")
    with pytest.raises(CheckpointError, match="state_dict.pt is empty"):
        load_native(str(saved.parent))


def test_truncated_weights_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_native(str(saved.parent))


def test_garbage_weights_file(saved):
    saved.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="cannot read .*state_dict.pt"):
        load_native(str(saved.parent))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_not_run(saved, monkeypatch):
    monkeypatch.chdir(saved.parent)
    torch.save({"norm.weight": _Evil()}, saved)
    with pytest.raises(CheckpointError, match="refused by the weights-only loader.*posix.system"):
        load_torch_file(str(saved))
    assert not os.path.exists("pwned")
    with pytest.raises(CheckpointError, match="weights-only loader") as info:
        with open(saved, "wb") as f:
            pickle.dump({"x": _Evil()}, f)
        load_torch_file(str(saved))
    assert "weights_only` set to `False`" not in str(info.value)  # no advice to load unsafely


def test_not_a_dict_of_tensors(saved):
    torch.save([torch.zeros(2)], saved)
    with pytest.raises(CheckpointError, match="does not hold a dict of tensors"):
        load_torch_file(str(saved))


def test_legacy_non_zip_pickle_loads(saved):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(sd, saved, _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch_file(str(saved))["w"], sd["w"])


def test_atomic_path_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out.pt"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(str(final)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.pt"]


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    config = tiny_config()
    sd = random_state_dict(config)
    save_native(str(tmp_path), config, sd)
    before = (tmp_path / "state_dict.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_native(str(tmp_path), config, {k: v + 1 for k, v in sd.items()})
    assert (tmp_path / "state_dict.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.json", "state_dict.pt"]

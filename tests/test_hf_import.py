"""utils.hf_import: HF checkpoints written by transformers -> native format, re-use, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from graph.config import ConfigError, LlamaConfig
from tests.helpers.tiny_models import LLAMA3_SCALING, make_hf_llama
from utils.checkpoint import CheckpointError, load_native
from utils.hf_import import HFImportError, convert, hf_to_native, main, parse_dtype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = {"model.json", "state_dict.pt"}


def assert_matches_hf(native_dir, model, dtype=torch.float32):
    """Every native tensor equals the HF model's tensors, fused in q,k,v / gate,up order."""
    config, sd = load_native(native_dir)
    hf = {k: v.to(dtype) for k, v in model.state_dict().items()}
    assert torch.equal(sd["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(sd["norm.weight"], hf["model.norm.weight"])
    for i in range(config.num_hidden_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        qkv = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(sd[n + "attention.wqkv.weight"], qkv)
        assert torch.equal(sd[n + "attention.wo.weight"], hf[p + "self_attn.o_proj.weight"])
        w13 = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        assert torch.equal(sd[n + "feed_forward.w13.weight"], w13)
        assert torch.equal(sd[n + "feed_forward.w2.weight"], hf[p + "mlp.down_proj.weight"])
        assert torch.equal(sd[n + "attention_norm.weight"], hf[p + "input_layernorm.weight"])
        assert torch.equal(sd[n + "ffn_norm.weight"], hf[p + "post_attention_layernorm.weight"])
    if config.tie_word_embeddings:
        assert "output.weight" not in sd
    else:
        assert torch.equal(sd["output.weight"], hf["lm_head.weight"])
    assert all(t.dtype == dtype for t in sd.values())
    return config, sd


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-"))


# ---- layouts written by transformers (and by older transformers, for .bin) -------------------
LAYOUTS = {
    "safetensors": dict(safe=True),
    "sharded-safetensors": dict(safe=True, max_shard_size="20KB"),
    "bin": dict(safe=False),
    "legacy-sharded-bin": dict(safe=False, max_shard_size="20KB"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_convert_to_the_same_tensors(tmp_path, layout):
    model = make_hf_llama(tmp_path, **LAYOUTS[layout])
    files = os.listdir(tmp_path)
    if "sharded" in layout:
        assert sum(".index.json" in f for f in files) == 1 and len(files) > 6
    assert convert(str(tmp_path)) == str(tmp_path)
    assert_matches_hf(str(tmp_path), model)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("options", [
    dict(n_kv_heads=1, tie=True),                       # MQA, tied head
    dict(n_kv_heads=4, head_dim=32),                    # MHA, head_dim != hidden / heads
    dict(rope_scaling=LLAMA3_SCALING, legacy_config=True),
    dict(tie=True, safe=False),                         # .bin keeps the tied lm_head: dropped
])
def test_model_variants(tmp_path, options):
    model = make_hf_llama(tmp_path, **options)
    convert(str(tmp_path))
    config, _ = assert_matches_hf(str(tmp_path), model)
    assert config.tie_word_embeddings == options.get("tie", False)
    assert config.head_dim == options.get("head_dim", 16)
    assert config.rope_type == ("llama3" if "rope_scaling" in options else "default")


# ---- dtype ---------------------------------------------------------------------------------
def test_dtype_none_keeps_config_dtype(tmp_path):
    model = make_hf_llama(tmp_path, dtype=torch.bfloat16)
    convert(str(tmp_path))
    config, _ = assert_matches_hf(str(tmp_path), model, torch.bfloat16)
    assert config.torch_dtype == "bfloat16"


@pytest.mark.parametrize("dtype", ["float16", torch.bfloat16])
def test_dtype_cast(tmp_path, dtype):
    model = make_hf_llama(tmp_path, max_shard_size="20KB")
    convert(str(tmp_path), dtype=dtype)
    config, _ = assert_matches_hf(str(tmp_path), model, parse_dtype(dtype))
    assert config.torch_dtype == str(parse_dtype(dtype)).removeprefix("torch.")


@pytest.mark.parametrize("dtype", ["int8", "float8", torch.float64, 3])
def test_bad_dtype(tmp_path, dtype):
    make_hf_llama(tmp_path, tokenizer=False)
    with pytest.raises(HFImportError, match="unsupported dtype .*float32, float16, bfloat16"):
        convert(str(tmp_path), dtype=dtype)
    assert not NATIVE & set(os.listdir(tmp_path))


# ---- re-use and redo -----------------------------------------------------------------------
def mtime(path):
    return os.stat(path).st_mtime_ns


def test_reused_when_unchanged(tmp_path):
    make_hf_llama(tmp_path, max_shard_size="20KB", tokenizer=False)
    convert(str(tmp_path), dtype="float32")
    stamps = (mtime(tmp_path / "state_dict.pt"), mtime(tmp_path / "model.json"))
    os.utime(tmp_path / "state_dict.pt", ns=(1, 1))  # any rewrite would change this
    os.utime(tmp_path / "model.json", ns=(1, 1))
    convert(str(tmp_path), dtype="float32")
    convert(str(tmp_path))  # None means config.json's float32: the same conversion
    assert mtime(tmp_path / "state_dict.pt") == 1 and mtime(tmp_path / "model.json") == 1
    assert stamps[0] != 1
    source = json.loads((tmp_path / "model.json").read_text())["source"]
    weight_files = [f for f in os.listdir(tmp_path) if f.startswith("model") and f != "model.json"]
    assert source["dtype"] == "float32" and set(source["files"]) == {"config.json", *weight_files}


def test_redone_when_a_shard_changes(tmp_path):
    model = make_hf_llama(tmp_path, max_shard_size="20KB", tokenizer=False)
    convert(str(tmp_path))
    os.utime(tmp_path / "state_dict.pt", ns=(1, 1))
    shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
    st = os.stat(tmp_path / shard)
    os.utime(tmp_path / shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    convert(str(tmp_path))
    assert mtime(tmp_path / "state_dict.pt") != 1
    assert_matches_hf(str(tmp_path), model)


def test_redone_when_config_or_dtype_changes(tmp_path):
    make_hf_llama(tmp_path, safe=False, tokenizer=False)
    convert(str(tmp_path))
    os.utime(tmp_path / "state_dict.pt", ns=(1, 1))
    convert(str(tmp_path), dtype="bfloat16")
    assert LlamaConfig.load(str(tmp_path / "model.json")).torch_dtype == "bfloat16"
    assert mtime(tmp_path / "state_dict.pt") != 1

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    convert(str(tmp_path), dtype="bfloat16")
    assert LlamaConfig.load(str(tmp_path / "model.json")).rms_norm_eps == 1e-3


def test_redone_when_model_json_is_damaged(tmp_path):
    model = make_hf_llama(tmp_path, tokenizer=False)
    convert(str(tmp_path))
    (tmp_path / "model.json").write_text("{half a fi")
    convert(str(tmp_path))
    assert_matches_hf(str(tmp_path), model)


# ---- bad input: a clear message and no half-written output --------------------------------
def test_missing_and_empty_dir(tmp_path):
    with pytest.raises(HFImportError, match="model directory not found: .*nope"):
        convert(str(tmp_path / "nope"))
    with pytest.raises(HFImportError, match="model directory is empty"):
        convert(str(tmp_path))


def test_no_config_json(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    os.remove(tmp_path / "config.json")
    with pytest.raises(HFImportError, match="no config.json in"):
        convert(str(tmp_path))


def test_no_weights(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(HFImportError, match="no weights file in .*model.safetensors"):
        convert(str(tmp_path))


def test_shards_without_index(tmp_path):
    make_hf_llama(tmp_path, max_shard_size="20KB", tokenizer=False)
    os.remove(tmp_path / "model.safetensors.index.json")
    with pytest.raises(HFImportError, match="shard 'model-00001-of-.*but no index"):
        convert(str(tmp_path))


@pytest.mark.parametrize("safe", [True, False])
def test_index_names_a_missing_shard(tmp_path, safe):
    make_hf_llama(tmp_path, safe=safe, max_shard_size="20KB", tokenizer=False)
    shard = sorted(f for f in os.listdir(tmp_path) if "-of-" in f)[2]
    os.remove(tmp_path / shard)
    with pytest.raises(HFImportError, match=f"names shard '{shard}', which is missing"):
        convert(str(tmp_path))


@pytest.mark.parametrize("index,message", [
    ("{broken", "is not a valid index file"),
    ("[]", "is not a valid index file"),
    ('{"metadata": {}}', "has no 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": "../model.safetensors"}}', "invalid shard file '../model"),
])
def test_bad_index(tmp_path, index, message):
    make_hf_llama(tmp_path, max_shard_size="20KB", tokenizer=False)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(HFImportError, match=message):
        convert(str(tmp_path))


def test_index_places_a_weight_in_the_wrong_shard(tmp_path):
    make_hf_llama(tmp_path, max_shard_size="20KB", tokenizer=False)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = min(index["weight_map"].values())
    index["weight_map"]["model.norm.weight"] = first
    path.write_text(json.dumps(index))
    with pytest.raises(HFImportError, match=f"'{first}' does not hold weight 'model.norm.weight'"):
        convert(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
@pytest.mark.parametrize("safe", [True, False])
def test_corrupt_weights_file(tmp_path, damage, safe):
    make_hf_llama(tmp_path, safe=safe, tokenizer=False)
    path = tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"\x07garbage" * 50,
                      "empty": b""}[damage])
    message = "is empty" if damage == "empty" else f"cannot read .*{path.name}"
    with pytest.raises(HFImportError, match=message):
        convert(str(tmp_path))
    assert not NATIVE & set(os.listdir(tmp_path)) and leftovers(tmp_path) == []


@pytest.mark.parametrize("safe", [True, False])
def test_corrupt_second_shard_leaves_no_output(tmp_path, safe):
    make_hf_llama(tmp_path, safe=safe, max_shard_size="20KB", tokenizer=False)
    convert(str(tmp_path))  # a good conversion first: it must not survive as if still valid
    shard = sorted(f for f in os.listdir(tmp_path) if "-of-" in f)[1]
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(HFImportError, match=f"cannot read .*{shard}: truncated or corrupt"):
        convert(str(tmp_path))
    assert not NATIVE & set(os.listdir(tmp_path)) and leftovers(tmp_path) == []


def test_disk_full_while_writing(tmp_path, monkeypatch):
    make_hf_llama(tmp_path, tokenizer=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / ".tmp-x"))
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(HFImportError, match="cannot convert .*No space left on device"):
        convert(str(tmp_path))
    assert not NATIVE & set(os.listdir(tmp_path)) and leftovers(tmp_path) == []


def test_shape_mismatch_names_the_tensor(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(HFImportError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                            r"\(128, 64\), but config.json needs \(96, 64\)"):
        convert(str(tmp_path))
    assert not NATIVE & set(os.listdir(tmp_path))


def test_invalid_config_json_names_the_key(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match="'model_type' is 'mistral'"):
        convert(str(tmp_path))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        convert(str(tmp_path))


def test_untied_config_without_lm_head(tmp_path):
    make_hf_llama(tmp_path, tie=True, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(HFImportError, match="'lm_head.weight' is missing, but config.json has "
                                            "tie_word_embeddings false"):
        convert(str(tmp_path))


def test_fewer_layers_in_weights_than_config(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(HFImportError, match="'model.layers.2.input_layernorm.weight' is missing"):
        convert(str(tmp_path))


# ---- hf_to_native on its own (the GGUF importer reuses it) ---------------------------------
@pytest.fixture(scope="module")
def small():
    config = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4),
              "model.layers.0.self_attn.q_proj.weight": (4, 4),
              "model.layers.0.self_attn.k_proj.weight": (2, 4),
              "model.layers.0.self_attn.v_proj.weight": (2, 4),
              "model.layers.0.self_attn.o_proj.weight": (4, 4),
              "model.layers.0.mlp.gate_proj.weight": (6, 4),
              "model.layers.0.mlp.up_proj.weight": (6, 4),
              "model.layers.0.mlp.down_proj.weight": (4, 6),
              "model.layers.0.input_layernorm.weight": (4,),
              "model.layers.0.post_attention_layernorm.weight": (4,)}
    return config, {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_hf_to_native_fuses_and_ignores_inv_freq(small):
    config, hf = small
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(1)}
    sd = hf_to_native({**hf, **extra}, config, None)
    wqkv = sd["layers.0.attention.wqkv.weight"]
    assert wqkv.shape == (8, 4) and torch.equal(wqkv[4:6], hf["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(sd["layers.0.feed_forward.w13.weight"][6:], hf["model.layers.0.mlp.up_proj.weight"])
    assert sd["output.weight"] is not None and len(sd) == 9


def test_hf_to_native_drops_tied_head_and_casts(small):
    config, hf = small
    tied = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    sd = hf_to_native(hf, tied, torch.float16)
    assert "output.weight" not in sd and all(t.dtype == torch.float16 for t in sd.values())


def test_hf_to_native_unknown_key(small):
    config, hf = small
    with pytest.raises(HFImportError, match="unexpected weight 'model.layers.0.self_attn.q_proj.bias'"):
        hf_to_native({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(4)}, config, None)


def test_hf_to_native_copies_views_so_saved_files_stay_small(small):
    config, hf = small
    big = torch.randn(1000, 4)
    sd = hf_to_native({**hf, "model.norm.weight": big[7]}, config, None)
    t = sd["norm.weight"]
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_hf_to_native_reads_each_tensor_once(small):
    config, hf = small
    reads = []

    class Counting(dict):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)
    hf_to_native(Counting(hf), config, None)
    assert sorted(reads) == sorted(hf)


# ---- command line --------------------------------------------------------------------------
def test_cli_converts(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    result = subprocess.run([sys.executable, "-m", "utils.hf_import", str(tmp_path), "--dtype", "bfloat16"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "model.json") in result.stdout
    assert LlamaConfig.load(str(tmp_path / "model.json")).torch_dtype == "bfloat16"


def test_cli_in_process(tmp_path, capsys):
    make_hf_llama(tmp_path, tokenizer=False)
    assert main([str(tmp_path), "--dtype", "float16"]) == 0
    assert capsys.readouterr().out.strip() == f"native checkpoint: {tmp_path / 'model.json'} + state_dict.pt"
    assert LlamaConfig.load(str(tmp_path / "model.json")).torch_dtype == "float16"


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "utils.hf_import", str(tmp_path / "nope")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'nope'}"]


@pytest.mark.parametrize("argv,message", [
    (["DIR", "--dtype", "int4"], "error: unsupported dtype 'int4'"),
    ([], "error: the following arguments are required: HF_DIR"),
    (["DIR", "--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_cli_errors_in_process(tmp_path, capsys, argv, message):
    make_hf_llama(tmp_path, tokenizer=False)
    try:
        code = main([str(tmp_path) if a == "DIR" else a for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message)


def test_cli_config_error(tmp_path, capsys):
    make_hf_llama(tmp_path, tokenizer=False)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: config key 'model_type' is 'gpt2'; "
                                               "only 'llama' is supported")


def test_hf_import_error_is_a_checkpoint_error():
    assert issubclass(HFImportError, CheckpointError)

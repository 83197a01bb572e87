"""LlamaConfig from HF config.json (both rope styles) and its native JSON form."""
import json

import pytest

from graph.config import ConfigError, LlamaConfig

BASE = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def hf(**changes):
    return {**BASE, **changes}


def test_legacy_rope_style_top_level_theta_and_scaling():
    c = LlamaConfig.from_hf_dict(hf(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3}))
    assert c.rope_theta == 500000.0
    assert c.rope_type == "llama3" and c.rope_scaling["factor"] == 8.0


def test_legacy_rope_scaling_with_old_type_key():
    c = LlamaConfig.from_hf_dict(hf(rope_scaling={"type": "linear", "factor": 2.0}))
    assert c.rope_type == "linear" and c.rope_scaling["factor"] == 2.0


def test_rope_parameters_style():
    c = LlamaConfig.from_hf_dict(hf(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}))
    assert c.rope_theta == 5e5 and c.rope_type == "llama3"
    assert "rope_theta" not in c.rope_scaling
    assert c.rope_scaling["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_default_rope_has_no_scaling(style):
    extra = ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}} if style == "rope_parameters"
             else {"rope_theta": 1e4, "rope_scaling": {"rope_type": "default"}})
    c = LlamaConfig.from_hf_dict(hf(**extra))
    assert c.rope_scaling is None and c.rope_type == "default" and c.rope_theta == 1e4


def test_head_dim_defaults_to_hidden_over_heads_and_explicit_wins():
    assert LlamaConfig.from_hf_dict(hf()).head_dim == 16
    c = LlamaConfig.from_hf_dict(hf(head_dim=32))
    assert c.head_dim == 32 and c.q_size == 128 and c.kv_size == 64


@pytest.mark.parametrize("kv_heads,expected", [(4, 4), (2, 2), (1, 1), (None, 4)])
def test_mha_gqa_mqa(kv_heads, expected):
    cfg = hf(num_key_value_heads=kv_heads)
    assert LlamaConfig.from_hf_dict(cfg).num_key_value_heads == expected


@pytest.mark.parametrize("eos,expected", [(2, [2]), ([2, 7], [2, 7]), (None, [])])
def test_eos_int_or_list(eos, expected):
    assert LlamaConfig.from_hf_dict(hf(eos_token_id=eos)).eos_token_id == expected


@pytest.mark.parametrize("key,value", [("torch_dtype", "bfloat16"), ("dtype", "float16")])
def test_dtype_from_either_key(key, value):
    assert LlamaConfig.from_hf_dict(hf(**{key: value})).torch_dtype == value


def test_defaults_follow_transformers():
    c = LlamaConfig.from_hf_dict(hf())
    assert (c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == (1e-6, 2048, False)


@pytest.mark.parametrize("changes,key", [
    ({"model_type": "mistral"}, "'model_type'"),
    ({"attention_bias": True}, "'attention_bias'"),
    ({"mlp_bias": True}, "'mlp_bias'"),
    ({"hidden_act": "gelu"}, "'hidden_act'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'rope_scaling.low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'rope_scaling.factor'"),
    ({"num_key_value_heads": 3}, "'num_key_value_heads'"),
    ({"hidden_size": 66}, "'head_dim'"),
    ({"head_dim": 15}, "'head_dim'"),
    ({"hidden_size": "64"}, "'hidden_size'"),
    ({"num_attention_heads": 0}, "'num_attention_heads'"),
    ({"vocab_size": -1}, "'vocab_size'"),
])
def test_refusals_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        LlamaConfig.from_hf_dict(hf(**changes))


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads"])
def test_missing_key_is_named(key):
    cfg = hf()
    del cfg[key]
    with pytest.raises(ConfigError, match=f"missing key '{key}'"):
        LlamaConfig.from_hf_dict(cfg)


def test_missing_model_type_is_refused():
    cfg = hf()
    del cfg["model_type"]
    with pytest.raises(ConfigError, match="'model_type' is None"):
        LlamaConfig.from_hf_dict(cfg)


def test_native_json_round_trip(tmp_path):
    c = LlamaConfig.from_hf_dict(hf(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3},
                                    eos_token_id=[1, 2], bos_token_id=0, tie_word_embeddings=True,
                                    torch_dtype="bfloat16", head_dim=32))
    c.save(tmp_path / "model.json")
    assert LlamaConfig.load(str(tmp_path / "model.json")) == c


def test_native_json_ignores_extra_keys_and_names_missing_ones():
    c = LlamaConfig.from_hf_dict(hf())
    assert LlamaConfig.from_dict({**c.to_dict(), "source": {"x": 1}}) == c
    data = c.to_dict()
    del data["head_dim"]
    with pytest.raises(ConfigError, match="missing key 'head_dim'"):
        LlamaConfig.from_dict(data)


def test_native_json_rejects_unknown_dtype():
    data = LlamaConfig.from_hf_dict(hf()).to_dict()
    with pytest.raises(ConfigError, match="'torch_dtype'"):
        LlamaConfig.from_dict({**data, "torch_dtype": "int8"})


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe\x00", "is not valid JSON"),
])
def test_bad_config_file(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_file(str(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        LlamaConfig.from_hf_file(str(tmp_path / "config.json"))


def test_matches_transformers_written_config(tmp_path):
    from transformers import LlamaConfig as HFConfig
    HFConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=1, head_dim=8, rope_theta=321.0,
             rope_scaling={"rope_type": "llama3", **LLAMA3}, tie_word_embeddings=True,
             eos_token_id=[5, 6]).save_pretrained(tmp_path)
    c = LlamaConfig.from_hf_file(str(tmp_path / "config.json"))
    assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (3, 1, 8)
    assert c.rope_theta == 321.0 and c.rope_type == "llama3" and c.tie_word_embeddings
    assert c.eos_token_id == [5, 6]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_parse_dtype_names_aliases_and_torch_dtypes():
    import torch
    from graph.config import parse_dtype
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("half") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="unsupported dtype 'int4'; use one of float32"):
        parse_dtype("int4")

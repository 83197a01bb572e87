"""GGUF -> native: weights (every float and quantized type, Q/K permutation undone, tied head),
metadata -> LlamaConfig, the vocabulary as tokenizer.json, the cache, the script, bad files."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from graph.config import LlamaConfig
from tests.helpers.reference_bpe import ReferenceBPE
from tests.helpers.tiny_gguf import (gguf_tensors, permute, stored_values, vocab_metadata,
                                     write_gguf)
from tests.helpers.tiny_models import make_hf_llama
from tests.helpers.tiny_sentencepiece import train_sentencepiece
from utils import gguf_import
from utils.checkpoint import load_native
from utils.gguf_import import GGUFError, convert_gguf, ensure_converted
from utils.gguf_tokenizer import LLAMA3_PATTERN
from utils.tokenizer import Tokenizer, TokenizerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """GQA, untied head."""
    return make_hf_llama(tmp_path_factory.mktemp("hf"), tokenizer=False)


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory):
    """MQA, tied head, explicit head_dim (wider than hidden / heads)."""
    return make_hf_llama(tmp_path_factory.mktemp("hf_tied"), tie=True, n_kv_heads=1,
                         head_dim=32, seed=3, tokenizer=False)


def _fused(model, qtype: str) -> dict[str, torch.Tensor]:
    """The native state dict the file should give: HF weights after the file's rounding, fused."""
    g = {k: torch.from_numpy(stored_values(v, qtype)) for k, v in gguf_tensors(model).items()}
    cfg = model.config
    out = {"tok_embeddings.weight": g["token_embd.weight"], "norm.weight": g["output_norm.weight"]}
    if "output.weight" in g:
        out["output.weight"] = g["output.weight"]
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        # undo the permutation with numpy's swap of the same reshape: an independent inverse
        q = g[b + "attn_q.weight"].numpy()
        k = g[b + "attn_k.weight"].numpy()
        hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
        q = q.reshape(hq, -1, 2, q.shape[1]).swapaxes(1, 2).reshape(q.shape)
        k = k.reshape(hk, -1, 2, k.shape[1]).swapaxes(1, 2).reshape(k.shape)
        out[p + "attention.wqkv.weight"] = torch.cat(
            [torch.from_numpy(q), torch.from_numpy(k), g[b + "attn_v.weight"]])
        out[p + "attention.wo.weight"] = g[b + "attn_output.weight"]
        out[p + "attention_norm.weight"] = g[b + "attn_norm.weight"]
        out[p + "ffn_norm.weight"] = g[b + "ffn_norm.weight"]
        out[p + "feed_forward.w13.weight"] = torch.cat([g[b + "ffn_gate.weight"],
                                                        g[b + "ffn_up.weight"]])
        out[p + "feed_forward.w2.weight"] = g[b + "ffn_down.weight"]
    return out


def _hf_fused(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {}
    for i in range(model.config.num_hidden_layers):
        a = f"model.layers.{i}."
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [sd[a + "self_attn.q_proj.weight"], sd[a + "self_attn.k_proj.weight"],
             sd[a + "self_attn.v_proj.weight"]])
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
            [sd[a + "mlp.gate_proj.weight"], sd[a + "mlp.up_proj.weight"]])
    return out


# ---- weights --------------------------------------------------------------------------------
def test_f32_file_gives_the_hf_weights_exactly(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf, qtype="F32")
    config, sd = load_native(convert_gguf(path, str(tmp_path / "out")))
    assert config.torch_dtype == "float32" and not config.tie_word_embeddings
    for name, want in _hf_fused(hf).items():
        assert torch.equal(sd[name], want), name
    assert torch.equal(sd["output.weight"], hf.lm_head.weight.detach())
    assert torch.equal(sd["tok_embeddings.weight"], hf.model.embed_tokens.weight.detach())


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_every_type_dequantizes_to_the_stored_values(hf, tmp_path, qtype):
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=qtype)
    _, sd = load_native(convert_gguf(path, str(tmp_path / "out"), dtype="float32"))
    for name, want in _fused(hf, qtype).items():
        assert torch.equal(sd[name], want), name


def test_q8_0_is_within_its_rounding_of_the_source(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf, qtype="Q8_0")
    _, sd = load_native(convert_gguf(path, str(tmp_path / "out"), dtype="float32"))
    for name, want in _hf_fused(hf).items():
        blocks = want.reshape(-1, 32)
        # Q8_0: 32 values share scale d = amax / 127 (stored as float16): half a step of
        # rounding plus q (<= 127) times d's own float16 rounding
        amax = blocks.abs().amax(dim=1, keepdim=True)
        bound = amax / 127 / 2 + amax * 2.0 ** -11
        err = (sd[name].reshape(-1, 32) - blocks).abs()
        assert (err <= bound * 1.001).all(), name
        assert err.max() > 0  # it really was quantized


def test_tied_mqa_explicit_head_dim(hf_tied, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tied, qtype="F16")
    config, sd = load_native(convert_gguf(path, str(tmp_path / "out"), dtype="float16"))
    assert config.tie_word_embeddings and "output.weight" not in sd
    assert (config.head_dim, config.num_key_value_heads) == (32, 1)
    for name, want in _hf_fused(hf_tied).items():
        assert torch.equal(sd[name], want.half()), name


def test_default_dtype_follows_the_file(hf, tmp_path):
    for qtype, want in [("F32", "float32"), ("BF16", "bfloat16"), ("Q4_1", "float16")]:
        path = write_gguf(tmp_path / f"{qtype}.gguf", hf, qtype=qtype)
        config, sd = load_native(convert_gguf(path, str(tmp_path / qtype), dtype=None))
        assert config.torch_dtype == want
        assert sd["layers.0.attention.wqkv.weight"].dtype == getattr(torch, want)


def test_permutation_helper_is_inverted():
    w = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(64, 3)
    back = gguf_import._unpermute(torch.from_numpy(permute(w.numpy(), 4)), 4)
    assert torch.equal(back, w)


# ---- metadata -> config ----------------------------------------------------------------------
def test_config_from_metadata(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf)
    config = LlamaConfig.load(os.path.join(convert_gguf(path, str(tmp_path / "out")), "model.json"))
    c = hf.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size,
            config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (c.vocab_size, c.hidden_size, c.intermediate_size,
                                 c.num_hidden_layers, c.num_attention_heads,
                                 c.num_key_value_heads, c.head_dim)
    assert config.max_position_embeddings == c.max_position_embeddings
    assert config.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    assert config.rope_theta == c.rope_parameters["rope_theta"] and config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_id) == (c.bos_token_id, [c.eos_token_id])


def test_linear_rope_scaling(hf, tmp_path):
    def extra(w):
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
    path = write_gguf(tmp_path / "m.gguf", hf, extra=extra)
    config, _ = load_native(convert_gguf(path, str(tmp_path / "out")))
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def _llama3_factors(theta, dim, factor, low, high, old):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, retyped."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("head_dim,theta,old", [(16, 10000.0, 32), (64, 500000.0, 8192),
                                                (128, 500000.0, 8192)])
def test_llama3_rope_freqs_become_llama3_scaling(tmp_path, head_dim, theta, old):
    hf = make_hf_llama(tmp_path / "hf", hidden=head_dim * 2, n_heads=2, n_kv_heads=1,
                       layers=1, rope_theta=theta, tokenizer=False)
    factors = _llama3_factors(theta, head_dim, 8.0, 1.0, 4.0, old)
    path = write_gguf(tmp_path / "m.gguf", hf, tensors={"rope_freqs.weight": factors})
    config, sd = load_native(convert_gguf(path, str(tmp_path / "out")))
    s = config.rope_scaling
    assert s["rope_type"] == "llama3" and "rope_freqs.weight" not in sd
    assert (s["factor"], s["low_freq_factor"], s["original_max_position_embeddings"]) == (8.0, 1.0, old)
    assert s["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)


def test_rope_freqs_of_another_shape_is_refused(hf, tmp_path):
    bumpy = np.array([1.0, 3.0, 1.5, 8.0, 2.0, 8.0, 8.0, 8.0], dtype=np.float32)
    path = write_gguf(tmp_path / "m.gguf", hf, tensors={"rope_freqs.weight": bumpy})
    with pytest.raises(GGUFError, match="'rope_freqs.weight' does not follow llama3"):
        convert_gguf(path, str(tmp_path / "out"))


# ---- bad files -------------------------------------------------------------------------------
BAD_METADATA = {
    "moe": (lambda w: w.add_expert_count(8), "mixture of experts"),
    "partial_rotary": (lambda w: w.add_rope_dimension_count(8),
                       "'llama.rope.dimension_count' = 8 rotates part"),
    "yarn": (lambda w: w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN),
             "'llama.rope.scaling.type' = 'yarn' is not supported"),
    "tokenizer_model": (lambda w: w.add_tokenizer_model("bert"),
                        "'tokenizer.ggml.model' = 'bert' is not supported"),
    "pre_tokenizer": (lambda w: w.add_tokenizer_pre("qwen2"),
                      "'tokenizer.ggml.pre' = 'qwen2' is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_unsupported_metadata_is_refused_by_name(hf, tmp_path, case):
    extra, message = BAD_METADATA[case]
    path = write_gguf(tmp_path / "m.gguf", hf, extra=extra)
    with pytest.raises((GGUFError, TokenizerError), match=message):
        convert_gguf(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.json")


def _pop(*keys):
    def extra(w):
        for key in keys:
            w.kv_data[0].pop(key)
    return extra


_YARN = lambda w: w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN)  # noqa: E731
BAD_FILES = {  # extra metadata, tensors, message
    "per_layer_heads": (lambda w: w.add_head_count([4, 4]), None,
                        "'llama.attention.head_count' varies per layer"),
    "value_length": (lambda w: (w.add_key_length(16), w.add_value_length(8)), None,
                     "'llama.attention.value_length' differs from the key length"),
    "no_embedding": (None, {"token_embd.weight": None}, "has no 'token_embd.weight' tensor"),
    "short_embedding": (None, {"token_embd.weight": np.ones((300, 64), np.float32)},
                        "vocabulary has 320 tokens but 'token_embd.weight' has only 300 rows"),
    "rope_freqs_and_yarn": (_YARN, {"rope_freqs.weight": np.ones(8, np.float32)},
                            "both rope_freqs.weight and rope scaling 'yarn'"),
    "rope_freqs_size": (None, {"rope_freqs.weight": np.full(3, 2.0, np.float32)},
                        "'rope_freqs.weight' has 3 values; expected 8"),
    "rope_freqs_step": (None, {"rope_freqs.weight": np.repeat([1.0, 8.0], 4).astype(np.float32)},
                        "'rope_freqs.weight' does not follow llama3"),
    "no_vocabulary": (_pop("tokenizer.ggml.tokens"), None,
                      "GGUF file has no vocabulary \\(tokenizer.ggml.tokens\\)"),
    "no_merges": (_pop("tokenizer.ggml.merges"), None,
                  "gpt2 vocabulary has no merges \\(tokenizer.ggml.merges\\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unusable_files_are_refused_with_the_reason(hf, tmp_path, case):
    extra, tensors, message = BAD_FILES[case]
    path = write_gguf(tmp_path / "m.gguf", hf, extra=extra, tensors=tensors)
    with pytest.raises((GGUFError, TokenizerError), match=message):
        convert_gguf(path, str(tmp_path / "out"))


def test_rope_freqs_of_ones_mean_no_scaling(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf, tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    config, _ = load_native(convert_gguf(path, str(tmp_path / "out")))
    assert config.rope_scaling is None


def test_other_architecture_is_refused_by_name(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf, arch="qwen2")
    with pytest.raises(GGUFError, match="'general.architecture' = 'qwen2' is not supported"):
        convert_gguf(path, str(tmp_path / "out"))


def test_missing_metadata_key_is_named(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf, arch="llama",
                      extra=lambda w: w.kv_data[0].pop("llama.block_count"))
    with pytest.raises(GGUFError, match="'llama.block_count' is missing"):
        convert_gguf(path, str(tmp_path / "out"))


def test_unsupported_tensor_type_is_refused_by_name(hf, tmp_path):
    w = gguf_tensors(hf)["blk.0.ffn_up.weight"]
    path = write_gguf(tmp_path / "m.gguf", hf, tensors={"blk.0.ffn_up.weight": w},
                      raw_types={"blk.0.ffn_up.weight": np.float64})
    with pytest.raises(GGUFError, match="'blk.0.ffn_up.weight' has type F64"):
        convert_gguf(path, str(tmp_path / "out"))


def test_unknown_tensor_is_refused_by_name(hf, tmp_path):
    bias = np.zeros(64, dtype=np.float32)
    path = write_gguf(tmp_path / "m.gguf", hf, tensors={"blk.0.attn_q.bias": bias})
    with pytest.raises(GGUFError, match="'blk.0.attn_q.bias' is not part of a Llama model"):
        convert_gguf(path, str(tmp_path / "out"))


def test_missing_part_of_a_fused_weight_is_named(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf, tensors={"blk.1.attn_v.weight": None})
    with pytest.raises(GGUFError, match="lacks part of 'layers.1.attention.wqkv.weight'"):
        convert_gguf(path, str(tmp_path / "out"))


@pytest.mark.parametrize("keep", [0.5, 0.98, 200])
def test_truncated_file_gives_a_clear_error(hf, tmp_path, keep):
    path = write_gguf(tmp_path / "m.gguf", hf, qtype="Q8_0")
    data = open(path, "rb").read()
    cut = int(len(data) * keep) if keep < 1 else keep
    with open(path, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(GGUFError, match="truncated or corrupt GGUF file"):
        convert_gguf(path, str(tmp_path / "out"))


def test_not_a_gguf_file_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_text("hello")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        convert_gguf(str(tmp_path / "x.gguf"), str(tmp_path / "out"))
    with pytest.raises(GGUFError, match="GGUF file not found"):
        ensure_converted(str(tmp_path / "nope.gguf"))


def test_unknown_dtype_is_refused(hf, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf)
    with pytest.raises(GGUFError, match="dtype 'int8' is not one of"):
        convert_gguf(path, str(tmp_path / "out"), dtype="int8")


# ---- tokenizer from the file ------------------------------------------------------------------
TEXTS = ["The capital of France is Paris.", "台灣的首都是？", "emoji 😀👍🏽 ok",
         "def add(a, b):\n    return a + b  # 2025\n", "  spaces\t\ttabs\r\n", "it's 12345 they'll"]


@pytest.mark.parametrize("pre", ["default", "smollm", "llama-bpe"])
def test_gpt2_vocab_tokenizes_like_the_reference_bpe(hf, tmp_path, pre):
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    path = write_gguf(tmp_path / "m.gguf", hf, pre=pre, chat_template=template, add_bos=False)
    tok = Tokenizer.from_dir(convert_gguf(path, str(tmp_path / "out")))
    vocab = vocab_metadata(hf.config.vocab_size)
    ref = ReferenceBPE(vocab["tokens"], vocab["merges"], pre)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), (pre, text)
        assert tok.decode(ids) == text
    assert tok.chat_template == template and tok.add_bos is False
    assert (tok.bos_id, tok.eos_ids) == (0, [1])
    assert tok.encode("x<s>y", add_bos=False)[1] == 0  # control tokens are matched whole
    assert tok.vocab_size == hf.config.vocab_size


def test_user_defined_tokens_are_matched_whole_and_kept_in_decode(hf, tmp_path):
    vocab = vocab_metadata(hf.config.vocab_size)
    types = vocab["types"][:-1] + [4]  # the last pad token becomes USER_DEFINED

    def extra(w):
        w.kv_data[0].pop("tokenizer.ggml.token_type")
        w.add_token_types(types)
    tok = Tokenizer.from_dir(convert_gguf(write_gguf(tmp_path / "m.gguf", hf, extra=extra),
                                          str(tmp_path / "out")))
    last = vocab["tokens"][-1]
    ids = tok.encode(f"a{last}b", add_bos=False)
    assert len(vocab["tokens"]) - 1 in ids and tok.decode(ids) == f"a{last}b"


def test_llama_bpe_defaults_to_adding_bos(hf, tmp_path):
    tok = Tokenizer.from_dir(convert_gguf(write_gguf(tmp_path / "m.gguf", hf, pre="llama-bpe"),
                                          str(tmp_path / "out")))
    assert tok.add_bos and tok.encode("hi")[0] == 0


def test_reference_bpe_regexes_are_the_published_ones():
    """Guards the test's own reference: the Llama-3 split on a known string."""
    import regex
    assert regex.findall(LLAMA3_PATTERN, "I'M  12345 ok!!\n\n") == \
        ["I", "'M", " ", " ", "123", "45", " ok", "!!\n\n"]


# ---- sentencepiece-style ("llama") vocabularies -----------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_llama_vocab_tokenizes_like_sentencepiece(sp_model, hf, tmp_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1
             for i in range(n)]  # as convert_hf_to_gguf.py _create_vocab_sentencepiece

    def extra(w):
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            w.kv_data[0].pop(key, None)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(sp.unk_id())
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())

    hf_small = make_hf_llama(tmp_path / "hf", vocab=n, layers=1, tokenizer=False)
    path = write_gguf(tmp_path / "m.gguf", hf_small, extra=extra)
    tok = Tokenizer.from_dir(convert_gguf(path, str(tmp_path / "out")))
    assert tok.add_bos and tok.bos_id == sp.bos_id() and tok.eos_ids == [sp.eos_id()]
    for text in TEXTS + ["Hello world", " leading space", "ｆｕｌｌ ｗｉｄｔｈ ✓"]:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


# ---- the cache and the script -------------------------------------------------------------------
@pytest.fixture
def small_gguf(hf, tmp_path):
    os.makedirs(tmp_path / "src")
    return write_gguf(tmp_path / "src" / "m.gguf", hf, qtype="Q8_0")


def test_ensure_converted_caches_beside_the_file_and_reuses(small_gguf, monkeypatch):
    native = ensure_converted(small_gguf)
    assert native == small_gguf + ".llama-triton"
    assert sorted(os.listdir(native)) == ["model.json", "state_dict.pt", "tokenizer.json",
                                          "tokenizer_config.json"]
    assert [n for n in os.listdir(os.path.dirname(small_gguf)) if n.startswith(".")] == []

    def refuse(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf_import, "convert_gguf", refuse)
    assert ensure_converted(small_gguf) == native
    assert ensure_converted(small_gguf, dtype="float16") == native  # the default for Q8_0


def test_ensure_converted_redoes_a_changed_file_or_dtype(small_gguf):
    native = ensure_converted(small_gguf)
    st = os.stat(small_gguf)
    os.utime(small_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = os.stat(os.path.join(native, "state_dict.pt")).st_ino
    assert ensure_converted(small_gguf) == native
    assert os.stat(os.path.join(native, "state_dict.pt")).st_ino != before
    ensure_converted(small_gguf, dtype="float32")
    assert LlamaConfig.load(os.path.join(native, "model.json")).torch_dtype == "float32"


def test_ensure_converted_falls_back_to_the_cache_dir(small_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_CACHE", str(tmp_path / "cache"))
    beside = small_gguf + ".llama-triton"
    real = gguf_import._make_temp_beside
    # a read-only folder (chmod does not bind root, so refuse the location directly)
    monkeypatch.setattr(gguf_import, "_make_temp_beside",
                        lambda final: None if final == beside else real(final))
    native = ensure_converted(small_gguf)
    assert native.startswith(str(tmp_path / "cache" / "gguf" / "m.gguf-"))
    assert not os.path.exists(beside)
    assert ensure_converted(small_gguf) == native


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores chmod")
def test_read_only_folder_uses_the_cache_dir(small_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_CACHE", str(tmp_path / "cache"))
    os.chmod(os.path.dirname(small_gguf), 0o555)
    try:
        assert ensure_converted(small_gguf).startswith(str(tmp_path / "cache"))
    finally:
        os.chmod(os.path.dirname(small_gguf), 0o755)


def test_nowhere_writable_is_a_clear_error(small_gguf, monkeypatch):
    monkeypatch.setattr(gguf_import, "_make_temp_beside", lambda final: None)
    with pytest.raises(GGUFError, match="cannot write the converted model beside"):
        ensure_converted(small_gguf)


def test_interrupted_conversion_leaves_nothing(small_gguf, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf_import, "save_native", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(small_gguf)
    assert os.listdir(os.path.dirname(small_gguf)) == ["m.gguf"]


def test_progress_bar_only_when_asked_or_on_a_terminal(hf, tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", hf)
    convert_gguf(path, str(tmp_path / "a"), progress=True)  # stderr is captured: no terminal
    assert capsys.readouterr().err == ""
    convert_gguf(path, str(tmp_path / "b"), progress="always")
    err = capsys.readouterr().err
    n = len(gguf_tensors(hf))
    assert f"{n}/{n} tensors" in err and err.endswith("\n")


def test_script_converts(small_gguf, tmp_path):
    out = tmp_path / "native"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_gguf.py"),
                             small_gguf, str(out), "--dtype", "bfloat16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.load(open(out / "model.json"))["torch_dtype"] == "bfloat16"
    assert load_native(str(out))[1]["norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("args,message", [
    (["missing.gguf", "out"], "error: GGUF file not found: missing.gguf"),
    (["notgguf", "out"], "is not a GGUF file"),
    (["m.gguf", "out", "--dtype", "int4"], "error: argument --dtype: invalid choice"),
])
def test_script_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import convert_gguf as script
    finally:
        sys.path.pop(0)
    (tmp_path / "notgguf").write_text("nope")
    os.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(script.main(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1


# ---- the converted model runs -------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_logits_match_transformers(hf, tmp_path, qtype):
    """Q8_0 against transformers running the same rounded weights: the rounding is all the
    difference there is."""
    from api.inference import LlamaGenerator
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=qtype)
    exact = LlamaGenerator(convert_gguf(path, str(tmp_path / "f32"), dtype="float32"),
                           device="cpu", dtype="float32", kv_cache_tokens=256)
    ids = torch.randint(2, 320, (29,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = _with_weights(hf, _fused(hf, qtype))(torch.tensor([ids])).logits[0]
        source = hf(torch.tensor([ids])).logits[0]
    assert _rel(exact.logits(ids), want) < 1e-4
    if qtype == "Q8_0":
        # the rounding shows against the source model, within what Q8_0 explains
        assert 1e-4 < _rel(exact.logits(ids), source) < 2e-2
        # the file given directly is cached in float16 (its default for quantized weights)
        direct = LlamaGenerator(path, device="cpu", dtype="float32", kv_cache_tokens=256)
        assert direct.config.torch_dtype == "float16"
        assert _rel(direct.logits(ids), want) < 3e-3


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _with_weights(hf, native: dict):
    """A copy of the transformers model carrying the given native (fused) weights."""
    import copy
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
            q, k, v = native[p + "attention.wqkv.weight"].split(
                [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features])
            for lin, w in [(attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                           (attn.o_proj, native[p + "attention.wo.weight"]),
                           (mlp.down_proj, native[p + "feed_forward.w2.weight"])]:
                lin.weight.copy_(w)
            gate, up = native[p + "feed_forward.w13.weight"].chunk(2)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
        ref.model.embed_tokens.weight.copy_(native["tok_embeddings.weight"])
        ref.lm_head.weight.copy_(native["output.weight"])
    return ref

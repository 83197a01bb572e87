"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes a Llama, from a tiny
transformers model, for tests:

    model = make_hf_llama(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", model, qtype="Q8_0")

Q and K rows are permuted as llama.cpp permutes them; 1-D norms stay F32 as llama.cpp keeps
them; the vocabulary is tests/helpers/tiny_tokenizer's byte-level BPE as a "gpt2" vocab.
"""
from __future__ import annotations

import json

import gguf
import numpy as np

from tests.helpers.tiny_tokenizer import make_tokenizer

NORMAL, CONTROL, UNUSED = 1, 3, 5


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, retyped."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy order), Q/K permuted; output absent when tied."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                w = permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
            elif g == "attn_k":
                w = permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
            out[f"blk.{i}.{g}.weight"] = w
    return out


def encode_tensor(w: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The array to hand GGUFWriter.add_tensor and its raw_dtype, as llama.cpp stores it."""
    if w.ndim == 1 or qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    kind = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.quantize(w.astype(np.float32), kind), kind


def stored_values(w: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader gets back: the float32 values after the file's rounding."""
    data, kind = encode_tensor(w, qtype)
    if kind is None:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, kind).reshape(w.shape)


def vocab_metadata(vocab_size: int) -> dict:
    """tokenizer.ggml.* for the tiny byte-level BPE, padded to vocab_size like llama.cpp."""
    tok = make_tokenizer(vocab_size)
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [CONTROL if t in ("<s>", "</s>") else NORMAL for t in tokens]
    pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * pad
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(path, model, *, qtype: str = "F32", arch: str = "llama", pre: str = "default",
               chat_template: str | None = None, tensors: dict | None = None,
               raw_types: dict | None = None, extra=None, add_bos: bool | None = None) -> str:
    """Write model (a transformers LlamaForCausalLM) as a GGUF file at path.

    tensors: GGUF name -> array replacing/adding tensors (None drops one); raw_types: GGUF name
    -> numpy dtype to store that tensor in as-is (e.g. np.float64, a type nothing converts);
    extra(writer): adds or overrides metadata before the file is written.
    """
    cfg = model.config
    arrays = gguf_tensors(model)
    for name, value in (tensors or {}).items():
        if value is None:
            arrays.pop(name, None)
        else:
            arrays[name] = value
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    vocab = vocab_metadata(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    if extra:
        extra(w)
    for name, value in arrays.items():
        if raw_types and name in raw_types:
            w.add_tensor(name, value.astype(raw_types[name]))
            continue
        data, kind = encode_tensor(value, qtype)
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)

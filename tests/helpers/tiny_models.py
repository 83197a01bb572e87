"""Tiny random Llama checkpoints written by transformers' save_pretrained, plus a tokenizer,
so a test can load the folder as a whole model. transformers is a test-only dependency.

    from tests.helpers.tiny_models import make_hf_llama
    model = make_hf_llama(tmp_path, n_kv_heads=1, tie=True)   # MQA, tied head
"""
from __future__ import annotations

import json
import os

import torch

from tests.helpers.tiny_tokenizer import BOS_ID, EOS_ID, write_tokenizer

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def make_hf_llama(path, *, vocab: int = 320, hidden: int = 64, intermediate: int = 128,
                  layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                  head_dim: int | None = None, tie: bool = False,
                  rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                  max_positions: int = 256, rms_norm_eps: float = 1e-5,
                  dtype: torch.dtype = torch.float32, seed: int = 0, safe: bool = True,
                  max_shard_size: int | str | None = None, legacy_config: bool = False,
                  tokenizer: bool = True):
    """Build a random LlamaForCausalLM, save it to `path` and return it (in eval mode, in `dtype`).

    safe=True: save_pretrained's safetensors (sharded when max_shard_size is given, e.g. "20KB").
    safe=False: the legacy pytorch_model.bin, or sharded .bin + pytorch_model.bin.index.json when
    max_shard_size is given (transformers 5 no longer writes .bin; we torch.save it as older
    versions did, tied lm_head included). legacy_config=True rewrites config.json in the older
    style (top-level rope_theta / rope_scaling, torch_dtype) that hub Llama 2/3 files use.
    tokenizer=True adds tokenizer.json + tokenizer_config.json (BOS id 0, EOS id 1).
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" would clutter captured stderr
    os.makedirs(path, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden // n_heads,
        max_position_embeddings=max_positions, rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})},
        tie_word_embeddings=tie, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _randomize(model, seed)
    model = model.to(dtype).eval()
    model.config.dtype = dtype  # else config.json keeps saying float32
    if safe:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        model.save_pretrained(path, **kwargs)
    else:
        model.config.save_pretrained(path)
        save_legacy_bin(model.state_dict(), path, max_shard_size)
    if legacy_config:
        _legacy_config(os.path.join(path, "config.json"))
    if tokenizer:
        write_tokenizer(path, vocab)
    return model


def _randomize(model, seed: int) -> None:
    """Weights of O(1) effect: norms away from 1 (so swapped norms show) and fan-in scaled
    matrices (so logits are not all near zero and greedy picks are not near-ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def save_legacy_bin(state_dict: dict, path, max_shard_size: int | str | None = None) -> list[str]:
    """Write state_dict as pytorch_model.bin, or as pytorch_model-0000k-of-0000n.bin shards of
    at most max_shard_size bytes (one tensor may exceed it) + pytorch_model.bin.index.json.
    Returns the weight file names written."""
    state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    if max_shard_size is None:
        torch.save(state_dict, os.path.join(path, "pytorch_model.bin"))
        return ["pytorch_model.bin"]
    limit = _size_to_int(max_shard_size)
    shards, size = [{}], 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [f"pytorch_model-{k + 1:05d}-of-{len(shards):05d}.bin" for k in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        torch.save(shard, os.path.join(path, shard_name))
        weight_map.update(dict.fromkeys(shard, shard_name))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _size_to_int(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(size[:-2]) * units[size[-2:].upper()]


def _legacy_config(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params.get("rope_type") == "default" else params
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)

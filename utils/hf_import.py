"""Hugging Face Llama checkpoint -> native format (model.json + state_dict.pt), offline.

Reads config.json and one of: model.safetensors, sharded safetensors + model.safetensors.index.json,
pytorch_model.bin, or sharded .bin + pytorch_model.bin.index.json. The native files are written
beside the HF files (so the tokenizer is found there too) and re-used while the sources and the
dtype stay the same. `transformers` is never imported.

    python -m utils.hf_import HF_DIR [--dtype bfloat16]
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping

import torch

from graph.config import TORCH_DTYPES as DTYPES, ConfigError, LlamaConfig
from graph.config import parse_dtype as config_parse_dtype
from utils.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, save_native
from utils.cli import OneLineParser
from utils.hf_weights import HFImportError, LazyWeights, find_weight_files

HF_CONFIG = "config.json"
# Bump when the native output of the same source would differ: forces a re-conversion.
FORMAT_VERSION = 1


# ---- name mapping ---------------------------------------------------------------------------
def _plan(c: LlamaConfig) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """native name -> the HF tensors (name, shape) whose rows are concatenated into it."""
    h, hd = c.hidden_size, (c.hidden_size,)
    plan = [("tok_embeddings.weight", [("model.embed_tokens.weight", (c.vocab_size, h))])]
    for i in range(c.num_hidden_layers):
        hf, nat = f"model.layers.{i}.", f"layers.{i}."
        plan += [
            (nat + "attention_norm.weight", [(hf + "input_layernorm.weight", hd)]),
            (nat + "attention.wqkv.weight", [(hf + "self_attn.q_proj.weight", (c.q_size, h)),
                                             (hf + "self_attn.k_proj.weight", (c.kv_size, h)),
                                             (hf + "self_attn.v_proj.weight", (c.kv_size, h))]),
            (nat + "attention.wo.weight", [(hf + "self_attn.o_proj.weight", (h, c.q_size))]),
            (nat + "ffn_norm.weight", [(hf + "post_attention_layernorm.weight", hd)]),
            (nat + "feed_forward.w13.weight", [(hf + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                                               (hf + "mlp.up_proj.weight", (c.intermediate_size, h))]),
            (nat + "feed_forward.w2.weight", [(hf + "mlp.down_proj.weight", (h, c.intermediate_size))]),
        ]
    plan.append(("norm.weight", [("model.norm.weight", hd)]))
    if not c.tie_word_embeddings:
        plan.append(("output.weight", [("lm_head.weight", (c.vocab_size, h))]))
    return plan


def _check_names(names, plan, config: LlamaConfig) -> None:
    wanted = {name for _, parts in plan for name, _ in parts}
    # a tied head is the embedding; rotary inv_freq is recomputed from the config
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unknown = sorted(n for n in names
                     if n not in wanted and n not in ignored and not n.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise HFImportError(f"unexpected weight '{unknown[0]}' in the checkpoint "
                            f"({len(unknown)} unexpected in all); is this a Llama model?")
    missing = [n for n in sorted(wanted) if n not in names]
    if "lm_head.weight" in missing:
        raise HFImportError("weight 'lm_head.weight' is missing, but config.json has "
                            "tie_word_embeddings false")
    if missing:
        raise HFImportError(f"weight '{missing[0]}' is missing from the checkpoint "
                            f"({len(missing)} missing in all)")


def _owned(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage; copy views so the file holds only this tensor
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def hf_to_native(hf_state_dict: Mapping[str, torch.Tensor], config: LlamaConfig,
                 dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Map HF Llama weight names to the native fused ones (see utils/checkpoint.py).

    wqkv = cat(q_proj, k_proj, v_proj) rows, w13 = cat(gate_proj, up_proj) rows; Q/K rows keep
    HF's rotary layout. lm_head.weight is dropped when config.tie_word_embeddings; rotary
    inv_freq buffers are ignored; any other unknown, missing or misshapen tensor raises
    HFImportError naming it. dtype None keeps each tensor's dtype.

    hf_state_dict may be any Mapping (a lazy one loading on access): each tensor is read once
    and not kept, so peak memory stays near one copy of the weights.
    """
    plan = _plan(config)
    _check_names(set(hf_state_dict.keys()), plan, config)
    native = {}
    for native_name, parts in plan:
        tensors = []
        for name, shape in parts:
            t = hf_state_dict[name]
            if tuple(t.shape) != shape:
                raise HFImportError(f"weight '{name}' has shape {tuple(t.shape)}, but config.json "
                                    f"needs {shape}")
            tensors.append(t)
        fused = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        native[native_name] = _owned(fused if dtype is None else fused.to(dtype))
    return native


# ---- conversion with re-use -----------------------------------------------------------------
def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    try:
        return config_parse_dtype(dtype)
    except ConfigError as e:
        raise HFImportError(str(e)) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _fingerprint(hf_dir: str, sources: list[str], dtype: torch.dtype) -> dict:
    files = {}
    for name in [HF_CONFIG, *sources]:
        st = os.stat(os.path.join(hf_dir, name))
        files[name] = [st.st_size, st.st_mtime_ns]
    return {"format": FORMAT_VERSION, "dtype": _dtype_name(dtype), "files": files}


def _stored_fingerprint(hf_dir: str) -> dict | None:
    if not os.path.isfile(os.path.join(hf_dir, WEIGHTS_FILE)):
        return None
    try:
        with open(os.path.join(hf_dir, CONFIG_FILE), encoding="utf-8") as f:
            return json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_stale(hf_dir: str) -> None:
    # model.json first: it marks a finished conversion, so it must never outlive its weights
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _check_dir(hf_dir: str) -> None:
    if not os.path.isdir(hf_dir):
        raise HFImportError(f"model directory not found: {hf_dir}")
    if not os.listdir(hf_dir):
        raise HFImportError(f"model directory is empty: {hf_dir}")
    if not os.path.isfile(os.path.join(hf_dir, HF_CONFIG)):
        raise HFImportError(f"no {HF_CONFIG} in {hf_dir}; not a Hugging Face model directory")


def convert(hf_dir: str, dtype: str | torch.dtype | None = None) -> str:
    """Convert hf_dir to the native format beside its files and return the folder (hf_dir).

    dtype None keeps config.json's torch_dtype. An earlier conversion is re-used when
    config.json, the weight files (names, sizes, mtimes) and the dtype are unchanged.
    Raises HFImportError (a CheckpointError) or ConfigError, naming the problem.
    """
    hf_dir = os.path.abspath(hf_dir)
    _check_dir(hf_dir)
    config = LlamaConfig.from_hf_file(os.path.join(hf_dir, HF_CONFIG))
    target = parse_dtype(config.torch_dtype if dtype is None else dtype)
    sources = find_weight_files(hf_dir)
    fingerprint = _fingerprint(hf_dir, sources, target)
    if _stored_fingerprint(hf_dir) == fingerprint:
        return hf_dir
    config = dataclasses.replace(config, torch_dtype=_dtype_name(target))
    try:
        _remove_stale(hf_dir)
        with LazyWeights(hf_dir, sources) as weights:
            state_dict = hf_to_native(weights, config, target)
        save_native(hf_dir, config, state_dict, extra_json={"source": fingerprint})
    except OSError as e:
        raise HFImportError(f"cannot convert {hf_dir}: {e.strerror or e} "
                            f"({e.filename or hf_dir})") from e
    return hf_dir


# ---- command line ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m utils.hf_import",
                            description="Convert a Hugging Face Llama checkpoint to the native "
                                        "format (model.json + state_dict.pt beside it).")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="folder holding config.json and weights")
    parser.add_argument("--dtype", default=None,
                        help=f"one of {', '.join(DTYPES)} (default: config.json's torch_dtype)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.hf_dir, args.dtype)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"native checkpoint: {os.path.join(out, CONFIG_FILE)} + {WEIGHTS_FILE}")
    return 0


__all__ = ["HFImportError", "hf_to_native", "convert", "parse_dtype", "main"]

if __name__ == "__main__":
    sys.exit(main())

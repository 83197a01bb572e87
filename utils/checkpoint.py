"""The native format: MODEL_DIR/model.json (LlamaConfig) + state_dict.pt (fused weights).

Weight names (the model in graph/llama.py reads exactly these):
  tok_embeddings.weight                 [vocab, hidden]
  layers.{i}.attention_norm.weight      [hidden]
  layers.{i}.attention.wqkv.weight      [(n_heads + 2 * n_kv_heads) * head_dim, hidden]  q, k, v rows
  layers.{i}.attention.wo.weight        [hidden, n_heads * head_dim]
  layers.{i}.ffn_norm.weight            [hidden]
  layers.{i}.feed_forward.w13.weight    [2 * intermediate, hidden]  gate rows then up rows
  layers.{i}.feed_forward.w2.weight     [hidden, intermediate]
  norm.weight                           [hidden]
  output.weight                         [vocab, hidden]  absent when tie_word_embeddings
Q and K rows follow Hugging Face's rotary layout (rotate_half: pairs (j, j + head_dim/2)).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from contextlib import contextmanager

import torch

from graph.config import ConfigError, LlamaConfig

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "state_dict.pt"


class CheckpointError(RuntimeError):
    """A weights file that cannot be used: missing, truncated, corrupt or of the wrong shape."""


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes = {"tok_embeddings.weight": (c.vocab_size, c.hidden_size),
              "norm.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (c.hidden_size,)
        shapes[p + "attention.wqkv.weight"] = (c.q_size + 2 * c.kv_size, c.hidden_size)
        shapes[p + "attention.wo.weight"] = (c.hidden_size, c.q_size)
        shapes[p + "ffn_norm.weight"] = (c.hidden_size,)
        shapes[p + "feed_forward.w13.weight"] = (2 * c.intermediate_size, c.hidden_size)
        shapes[p + "feed_forward.w2.weight"] = (c.hidden_size, c.intermediate_size)
    if not c.tie_word_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def check_state_dict(config: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Every expected weight present with the config's shape; nothing unexpected."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state_dict:
            raise CheckpointError(f"weight '{name}' is missing from the checkpoint")
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(f"weight '{name}' has shape {tuple(state_dict[name].shape)}, "
                                  f"but the config needs {shape}")
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected weight '{extra[0]}' in the checkpoint "
                              f"({len(extra)} unexpected in all)")


def is_native_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, CONFIG_FILE))
            and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def load_config(model_dir: str) -> LlamaConfig:
    return LlamaConfig.load(os.path.join(model_dir, CONFIG_FILE))


def load_native(model_dir: str) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read model.json + state_dict.pt (memory-mapped, weights only) and check the shapes."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory not found: {model_dir}")
    if not is_native_dir(model_dir):
        raise CheckpointError(f"{model_dir} holds no native checkpoint "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    config = load_config(model_dir)
    state_dict = load_torch_file(os.path.join(model_dir, WEIGHTS_FILE))
    check_state_dict(config, state_dict)
    return config, state_dict


def load_torch_file(path: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (a checkpoint is untrusted input), mmap when possible."""
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty")
    try:
        try:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # legacy (non-zip) pickles cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"cannot read {path}: not a plain weights file, refused by the "
                              f"weights-only loader ({_unpickler_reason(e)})") from e
    except MemoryError:
        raise
    except Exception as e:  # garbage bytes reach the unpickler as IndexError, KeyError, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({first_line})") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return data


def _unpickler_reason(e: Exception) -> str:
    """torch's weights-only refusal opens with advice to load unsafely; keep only the reason."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reasons = [ln for ln in lines if not ln.startswith(boilerplate)]
    return reasons[0] if reasons else type(e).__name__


@contextmanager
def atomic_path(final_path: str):
    """Yield a temporary path beside final_path; rename it into place only on success."""
    folder = os.path.dirname(os.path.abspath(final_path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(final_path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_native(model_dir: str, config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                extra_json: dict[str, dict] | None = None) -> None:
    """Write state_dict.pt then model.json, each atomically: model.json last marks completion."""
    check_state_dict(config, state_dict)
    os.makedirs(model_dir, exist_ok=True)
    contiguous = {k: v.contiguous() for k, v in state_dict.items()}
    with atomic_path(os.path.join(model_dir, WEIGHTS_FILE)) as tmp:
        torch.save(contiguous, tmp)
    with atomic_path(os.path.join(model_dir, CONFIG_FILE)) as tmp:
        config_dict = {**config.to_dict(), **(extra_json or {})}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config_dict, f, indent=2)


__all__ = ["CheckpointError", "ConfigError", "expected_shapes", "check_state_dict",
           "is_native_dir", "load_config", "load_native", "load_torch_file", "atomic_path",
           "save_native", "CONFIG_FILE", "WEIGHTS_FILE"]

"""LlamaConfig: the model's shape and numerics; model.json is its JSON form."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch


class ConfigError(ValueError):
    """A config the engine cannot run; the message names the offending key."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A run or storage dtype from its name ("bfloat16", "bf16", ...) or a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in TORCH_DTYPES.values():
        return dtype
    name = DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else None
    if name in TORCH_DTYPES:
        return TORCH_DTYPES[name]
    raise ConfigError(f"unsupported dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def __post_init__(self):
        self.eos_token_id = _as_id_list(self.eos_token_id)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config key '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config key 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config key 'head_dim' must be even for rotary, got {self.head_dim}")
        if self.torch_dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"config key 'torch_dtype' must be one of {SUPPORTED_DTYPES}, "
                              f"got {self.torch_dtype!r}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"config key 'rope_scaling' has rope type {rope_type!r}; "
                              f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        required = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")}.get(rope_type, ())
        for key in required:
            if key not in self.rope_scaling:
                raise ConfigError(f"config key 'rope_scaling.{key}' is required for "
                                  f"rope type {rope_type!r}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # ---- native JSON form -------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "LlamaConfig":
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "head_dim") if k not in data]
        if missing:
            raise ConfigError(f"model.json is missing key '{missing[0]}'")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str) -> "LlamaConfig":
        return cls.from_dict(_read_json(path))

    # ---- Hugging Face config.json ----------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict) -> "LlamaConfig":
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"config key 'model_type' is {model_type!r}; only 'llama' is supported")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConfigError(f"config key '{key}' is true; biases are not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config key 'hidden_act' is {act!r}; only 'silu' is supported")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"config.json is missing key '{key}'")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or _implied_head_dim(hf["hidden_size"], heads)
        rope_theta, rope_scaling = _hf_rope(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            torch_dtype=_hf_dtype(hf),
        )

    @classmethod
    def from_hf_file(cls, path: str) -> "LlamaConfig":
        return cls.from_hf_dict(_read_json(path))


def _hf_rope(hf: dict) -> tuple[float, dict | None]:
    """Both styles: top-level rope_theta + rope_scaling, or the newer rope_parameters dict."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    return float(theta), scaling


def _implied_head_dim(hidden: int, heads: int) -> int:
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {value!r}")
    # flooring would silently build a model of the wrong width
    if hidden % heads:
        raise ConfigError(f"config key 'head_dim' is needed: 'hidden_size' ({hidden!r}) is not a "
                          f"multiple of 'num_attention_heads' ({heads!r})")
    return hidden // heads


def _hf_dtype(hf: dict) -> str:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype if dtype in SUPPORTED_DTYPES else "float32"


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data

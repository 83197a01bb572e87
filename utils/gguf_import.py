"""llama.cpp GGUF files -> the native format (model.json + state_dict.pt + tokenizer files).

Weights are dequantized with the gguf package; Q and K rows are put back from llama.cpp's
interleaved-rotary order into Hugging Face's rotate_half order, which the engine uses.
ensure_converted() caches the result beside the file (or in the cache dir when that folder is
read-only), renaming a finished folder into place so a half-done conversion is never reused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

from graph.config import TORCH_DTYPES as DTYPES, LlamaConfig
from utils.checkpoint import CONFIG_FILE, save_native
from utils.gguf_tokenizer import end_of_generation_ids, write_tokenizer_files

SOURCE_KEY = "gguf_source"  # model.json entry recording which file (size, mtime) was converted

# GGUF tensor name -> native name; q/k/v and gate/up are fused afterwards
_LAYER_NAMES = {"attn_norm": "attention_norm", "attn_output": "attention.wo",
                "ffn_norm": "ffn_norm", "ffn_down": "feed_forward.w2"}
_FUSED = {"attn_q": 0, "attn_k": 1, "attn_v": 2, "ffn_gate": 0, "ffn_up": 1}
_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}


class GGUFError(ValueError):
    """A GGUF file this engine cannot use; the message names the file, key or tensor."""


# ---- reading ----------------------------------------------------------------------------
def open_gguf(path: str):
    from gguf import GGUFReader
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as e:
        # the reader fails inside numpy when the file ends before its header or tensors do
        raise GGUFError(f"cannot read {path}: truncated or corrupt GGUF file ({e})") from None


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            meta[key] = field.contents()
    return meta


# ---- metadata -> LlamaConfig ----------------------------------------------------------------
def config_from_metadata(meta: dict, tensors: dict, dtype: str) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture 'general.architecture' = {arch!r} is not supported "
                        f"(only 'llama')")

    def key(name, default=None, required=False):
        value = meta.get(f"llama.{name}", default)
        if required and value is None:
            raise GGUFError(f"GGUF metadata key 'llama.{name}' is missing")
        if isinstance(value, list):
            raise GGUFError(f"GGUF metadata key 'llama.{name}' varies per layer; not supported")
        return value

    if key("expert_count", 0):
        raise GGUFError("GGUF model is a mixture of experts ('llama.expert_count' = "
                        f"{key('expert_count')}); only dense Llama models are supported")
    hidden = key("embedding_length", required=True)
    heads = key("attention.head_count", required=True)
    head_dim = key("attention.key_length") or hidden // heads
    if key("attention.value_length", head_dim) != head_dim:
        raise GGUFError("GGUF metadata key 'llama.attention.value_length' differs from the "
                        "key length; not supported")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"GGUF metadata key 'llama.rope.dimension_count' = "
                        f"{key('rope.dimension_count')} rotates part of a {head_dim}-wide head; "
                        f"not supported")
    theta = float(key("rope.freq_base", 10000.0))
    vocab = _vocab_size(meta, tensors)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=key("feed_forward_length", required=True),
        num_hidden_layers=key("block_count", required=True),
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv") or heads,
        head_dim=head_dim, max_position_embeddings=key("context_length", 2048),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
        rope_scaling=_rope_scaling(meta, tensors, theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=end_of_generation_ids(meta), torch_dtype=dtype)


def _vocab_size(meta: dict, tensors: dict) -> int:
    """Rows of the embedding (it may be padded past the token list), else the token count."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF file has no 'token_embd.weight' tensor")
    rows = int(tensors["token_embd.weight"].shape[-1])
    if len(tokens) > rows:
        raise GGUFError(f"GGUF vocabulary has {len(tokens)} tokens but 'token_embd.weight' "
                        f"has only {rows} rows")
    return rows


def _rope_scaling(meta: dict, tensors: dict, theta: float, head_dim: int) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor") or meta.get("llama.rope.scale_linear")
    if "rope_freqs.weight" in tensors:
        if kind not in ("none", "llama3"):
            raise GGUFError(f"GGUF file has both rope_freqs.weight and rope scaling {kind!r}")
        factors = dequantize(tensors["rope_freqs.weight"]).reshape(-1).astype(np.float64)
        return llama3_scaling_from_factors(factors, theta, head_dim)
    if kind == "linear" or (kind == "none" and factor and factor != 1.0):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "none":
        raise GGUFError(f"GGUF metadata key 'llama.rope.scaling.type' = {kind!r} is not "
                        f"supported (supported: none, linear, llama3 rope_freqs)")
    return None


def _llama3_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Meta's Llama 3.1 rule, as llama.cpp's converter writes it into rope_freqs.weight."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old, lo, hi = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                   scaling["high_freq_factor"])
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    return np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, scaling["factor"], mid))


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover llama3 rope_scaling from the per-frequency divisors llama.cpp stores.

    Inside the ramp, smooth = old_ctx / (hi - lo) / wavelen - lo / (hi - lo) is a line in
    1 / wavelen; only its slope and intercept are fixed, so lo is taken as Llama 3's 1.0 (and
    hi as its 4.0 when a single point of the ramp is all there is). The result is checked
    against the tensor, so a guess that does not reproduce it is refused, never used.
    """
    name = "rope_freqs.weight"
    if factors.shape != (head_dim // 2,):
        raise GGUFError(f"GGUF tensor '{name}' has {factors.size} values; expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inner = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    smooth = (1 / factors[inner] - 1 / factor) / (1 - 1 / factor)
    inv_wavelen = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim))[inner] / (2 * math.pi)
    lo = 1.0
    if inner.sum() >= 2:
        slope, intercept = np.polyfit(inv_wavelen, smooth, 1)
        hi = lo - lo / intercept if intercept < 0 else float("nan")
        old = slope * (hi - lo)
    elif inner.sum() == 1:
        hi = 4.0
        old = float((smooth[0] * (hi - lo) + lo) / inv_wavelen[0])
    else:
        hi = old = float("nan")
    if not (np.isfinite(hi) and np.isfinite(old) and hi > lo and old > 0):
        raise GGUFError(f"GGUF tensor '{name}' does not follow llama3 rope scaling; not supported")
    old = round(old) if abs(old - round(old)) < 1e-3 * old else float(old)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
               "high_freq_factor": float(round(hi, 6)), "original_max_position_embeddings": old}
    if not np.allclose(_llama3_factors(scaling, theta, head_dim), factors, rtol=1e-4):
        raise GGUFError(f"GGUF tensor '{name}' does not follow llama3 rope scaling; not supported")
    return scaling


# ---- tensors ----------------------------------------------------------------------------------
def dequantize(tensor) -> np.ndarray:
    """float32 array in numpy order (GGUF lists dimensions innermost first)."""
    from gguf.quants import dequantize as gguf_dequantize
    try:
        values = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"GGUF tensor '{tensor.name}' has type {tensor.tensor_type.name}, which "
                        f"cannot be converted (float and llama.cpp quantized types only)") from None
    values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    # F32 comes back as a read-only view of the memory-mapped file
    return values if values.flags.writeable else values.copy()


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's permute: rows (head, pair, 2) back to (head, 2, half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _native_name(gguf_name: str) -> tuple[str, int | None]:
    """(native name, slot in a fused weight or None); unknown names refused by name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name], None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        layer, kind = f"layers.{parts[1]}.", parts[2]
        if kind in _LAYER_NAMES:
            return f"{layer}{_LAYER_NAMES[kind]}.weight", None
        if kind in _FUSED:
            fused = "attention.wqkv" if kind.startswith("attn") else "feed_forward.w13"
            return f"{layer}{fused}.weight", _FUSED[kind]
    raise GGUFError(f"GGUF tensor '{gguf_name}' is not part of a Llama model this engine runs")


def load_state_dict(tensors: dict, config: LlamaConfig, dtype: torch.dtype,
                    progress: "_Progress | None" = None) -> dict[str, torch.Tensor]:
    state, parts = {}, {}
    for gguf_name, tensor in tensors.items():
        if gguf_name == "rope_freqs.weight":  # already folded into config.rope_scaling
            continue
        name, slot = _native_name(gguf_name)
        w = torch.from_numpy(dequantize(tensor)).to(dtype)
        if gguf_name.endswith("attn_q.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        if slot is None:
            state[name] = w
        else:
            parts.setdefault(name, {})[slot] = w
        if progress:
            progress.step()
    for name, slots in parts.items():
        want = 3 if "wqkv" in name else 2
        if len(slots) != want:
            raise GGUFError(f"GGUF file lacks part of '{name}' ({len(slots)} of {want} tensors)")
        state[name] = torch.cat([slots[i] for i in range(want)], dim=0)
    return state


class _Progress:
    """A one-line bar on stderr, redrawn with \\r; no dependency on tqdm."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr

    def step(self) -> None:
        self.done += 1
        filled = 30 * self.done // max(self.total, 1)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                          f"{self.done}/{self.total} tensors")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


# ---- conversion -------------------------------------------------------------------------------
def default_dtype(tensors: dict) -> str:
    """Keep float32 files in float32 and BF16 in bfloat16; quantized and F16 weights fit float16
    (their scales are float16), which halves the cache compared with float32."""
    kinds = {t.tensor_type.name for n, t in tensors.items() if len(t.shape) > 1}
    if kinds <= {"F32"}:
        return "float32"
    return "bfloat16" if "BF16" in kinds else "float16"


def convert_gguf(gguf_path: str, out_dir: str, dtype: str | None = "float32",
                 progress: bool | str = True) -> str:
    """Write model.json, state_dict.pt, tokenizer.json and tokenizer_config.json to out_dir.

    progress: True shows a bar when stderr is a terminal, "always" forces it, False hides it.
    dtype None picks default_dtype(). Returns out_dir.
    """
    reader = open_gguf(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    dtype = dtype or default_dtype(tensors)
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    meta = read_metadata(reader)
    config = config_from_metadata(meta, tensors, dtype)
    show = progress == "always" or (progress is True and sys.stderr.isatty())
    bar = _Progress(len(tensors) - ("rope_freqs.weight" in tensors),
                    f"converting {os.path.basename(gguf_path)}") if show else None
    write_tokenizer_files(meta, out_dir)  # first: a vocabulary problem shows before the slow part
    state = load_state_dict(tensors, config, DTYPES[dtype], bar)
    st = os.stat(gguf_path)
    source = {"path": os.path.abspath(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    save_native(out_dir, config, state, extra_json={SOURCE_KEY: source})
    return out_dir


def cache_root() -> str:
    return os.environ.get("LLAMA_TRITON_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llama-triton")


def _cache_dirs(gguf_path: str) -> list[str]:
    """Beside the file first; under the cache dir (keyed by the full path) as the fallback."""
    path = os.path.abspath(gguf_path)
    key = hashlib.sha256(path.encode()).hexdigest()[:12]
    return [path + ".llama-triton",
            os.path.join(cache_root(), "gguf", f"{os.path.basename(path)}-{key}")]


def _is_current(native_dir: str, gguf_path: str, dtype: str | None) -> bool:
    try:
        with open(os.path.join(native_dir, CONFIG_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    st = os.stat(gguf_path)
    source = data.get(SOURCE_KEY) or {}
    return (source.get("size") == st.st_size and source.get("mtime_ns") == st.st_mtime_ns
            and (dtype is None or data.get("torch_dtype") == dtype))


def ensure_converted(gguf_path: str, dtype: str | None = None, progress: bool | str = True) -> str:
    """The native folder for gguf_path, converting first unless an up-to-date one exists."""
    if not os.path.isfile(gguf_path):
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    candidates = _cache_dirs(gguf_path)
    for native_dir in candidates:
        if _is_current(native_dir, gguf_path, dtype):
            return native_dir
    for native_dir in candidates:
        tmp = _make_temp_beside(native_dir)
        if tmp is None:
            continue  # read-only location: try the next one
        try:
            convert_gguf(gguf_path, tmp, dtype, progress)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it private to this user
            _move_into_place(tmp, native_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return native_dir
    raise GGUFError(f"cannot write the converted model beside {gguf_path} nor under "
                    f"{cache_root()} (set LLAMA_TRITON_CACHE to a writable folder)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_temp_beside(final_dir: str) -> str | None:
    parent = os.path.dirname(final_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(final_dir) + "-")
    except OSError:
        return None


def _move_into_place(tmp: str, final_dir: str) -> None:
    """Swap the finished folder in; a stale one is moved aside first (rename needs it gone)."""
    stale = None
    if os.path.exists(final_dir):
        stale = tempfile.mkdtemp(dir=os.path.dirname(final_dir), prefix=".stale-")
        os.replace(final_dir, os.path.join(stale, "old"))
    os.replace(tmp, final_dir)
    if stale:
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["GGUFError", "convert_gguf", "ensure_converted", "open_gguf", "read_metadata",
           "config_from_metadata", "load_state_dict", "dequantize", "default_dtype",
           "llama3_scaling_from_factors", "cache_root"]

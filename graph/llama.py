"""The Llama model: embedding -> blocks (attention + SwiGLU MLP) -> norm -> head.

Weights use the native fused names (see utils/checkpoint.py). Every op goes through kernels/,
which runs Triton on CUDA tensors and the PyTorch reference elsewhere. The KV cache is passed in
as tensors (one K and one V pool per layer), so this module knows nothing of how pages are managed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from graph.config import LlamaConfig
from kernels.attention import NewTokens, paged_attention
from kernels.gate_up_silu import gate_up_silu
from kernels.linear import cpu_layout, linear
from kernels.rmsnorm import rmsnorm
from kernels.rotary import rope_tables


@dataclass
class BatchMeta:
    """Where each token of a flattened batch sits: its position, its cache slot, its sequence."""
    positions: torch.Tensor          # int64 [T]
    slot_mapping: torch.Tensor       # int64 [T]: block * block_size + row
    block_tables: torch.Tensor       # int32 [B, max_blocks] (decode: int32/int64, any strides)
    seq_lens: torch.Tensor           # int32 [B]: KV length after this step (decode: or int64)
    query_start_loc: torch.Tensor    # int32 [B + 1]
    max_query_len: int
    max_seq_len: int

    def to(self, device: torch.device) -> "BatchMeta":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return BatchMeta(**moved)


def _concrete(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:N', so that devices compare equal to tensors' devices."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class LlamaModel:
    def __init__(self, config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                 layer_devices: list[torch.device], dtype: torch.dtype):
        if len(layer_devices) != config.num_hidden_layers:
            raise ValueError("one device per layer is needed")
        self.config = config
        self.dtype = dtype
        self.layer_devices = [_concrete(torch.device(d)) for d in layer_devices]
        self.first_device = self.layer_devices[0]
        self.last_device = self.layer_devices[-1]
        self.scale = config.head_dim ** -0.5
        self.layers = [self._layer_weights(state_dict, i) for i in range(config.num_hidden_layers)]
        self.embed = state_dict["tok_embeddings.weight"].to(self.first_device, self.dtype).contiguous()
        self.norm = self._take(state_dict, "norm.weight", self.last_device)
        head_name = "tok_embeddings.weight" if config.tie_word_embeddings else "output.weight"
        self.head = self._take(state_dict, head_name, self.last_device)
        # runs of consecutive layers on one device; a CUDA graph is captured per segment
        self.segments = self._segments()
        self.rope = {}
        for device in dict.fromkeys(self.layer_devices):
            self.rope[device] = rope_tables(config.head_dim, config.max_position_embeddings,
                                            config.rope_theta, config.rope_scaling, device)

    def _take(self, state_dict, name, device):
        weight = state_dict[name].to(device=device, dtype=self.dtype)
        if device.type == "cpu" and weight.dim() == 2:
            return cpu_layout(weight)  # kernels.linear runs it as one GEMV per core
        return weight.contiguous()

    def _layer_weights(self, state_dict, i):
        device = self.layer_devices[i]
        names = ("attention_norm", "attention.wqkv", "attention.wo", "ffn_norm",
                 "feed_forward.w13", "feed_forward.w2")
        return {n: self._take(state_dict, f"layers.{i}.{n}.weight", device) for n in names}

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys(self.layer_devices))

    def _segments(self) -> list[tuple[torch.device, int, int]]:
        """(device, first layer, end layer) for each run of consecutive layers on one device."""
        runs = []
        for i, device in enumerate(self.layer_devices):
            if runs and runs[-1][0] == device:
                runs[-1][2] = i + 1
            else:
                runs.append([device, i, i + 1])
        return [tuple(r) for r in runs]

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run the flattened batch; returns the final-normed hidden states [T, hidden]."""
        metas = {self.first_device: meta}
        hidden, residual = self.embed_tokens(input_ids.to(self.first_device)), None
        for device, start, end in self.segments:
            if hidden.device != device:
                hidden, residual = hidden.to(device), residual.to(device)
            if device not in metas:
                metas[device] = meta.to(device)
            hidden, residual = self.run_layers(start, end, hidden, residual, metas[device],
                                               kv_caches)
        return self.final_norm(hidden, residual)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids]

    def run_layers(self, start: int, end: int, hidden, residual, meta: BatchMeta, kv_caches):
        """Layers start..end-1, all on one device; residual is None before the first layer."""
        for i in range(start, end):
            # inside the run, the next block's RMSNorm may sum w2's split-K partials itself
            hidden, residual = self._block(self.layers[i], hidden, residual, meta, kv_caches[i],
                                           sum_w2_later=i < end - 1)
        return hidden, residual

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if hidden.device != self.last_device:
            hidden, residual = hidden.to(self.last_device), residual.to(self.last_device)
        hidden, _ = rmsnorm(hidden, self.norm, self.config.rms_norm_eps, residual)
        return hidden

    def _block(self, w, hidden, residual, meta, kv_cache, sum_w2_later=False):
        c = self.config
        x, residual = rmsnorm(hidden, w["attention_norm"], c.rms_norm_eps, residual)
        attn = self._attention(linear(x, w["attention.wqkv"]), meta, kv_cache)
        hidden = linear(attn, w["attention.wo"], sum_later=True)
        x, residual = rmsnorm(hidden, w["ffn_norm"], c.rms_norm_eps, residual)
        hidden = linear(gate_up_silu(x, w["feed_forward.w13"]), w["feed_forward.w2"],
                        sum_later=sum_w2_later)
        return hidden, residual

    def _attention(self, qkv, meta, kv_cache):
        """Attention of this step's tokens over the paged cache (their k and v written into it
        first); [T, q_size]."""
        c = self.config
        tokens = qkv.shape[0]
        q = qkv[:, :c.q_size].view(tokens, c.num_attention_heads, c.head_dim)
        k = qkv[:, c.q_size:c.q_size + c.kv_size].view(tokens, c.num_key_value_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].view(tokens, c.num_key_value_heads, c.head_dim)
        cos, sin = self.rope[qkv.device]
        new = NewTokens(k, v, meta.positions, meta.slot_mapping, cos, sin)
        attn = paged_attention(q, *kv_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, meta.max_query_len, self.scale,
                               meta.max_seq_len, new=new)
        return attn.reshape(tokens, c.q_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Head projection of the given rows, as float32 [rows, vocab]."""
        return linear(hidden, self.head, out_dtype=torch.float32)

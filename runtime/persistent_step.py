"""The persistent batch-1 decode step's host side: the weights as TMA descriptors, the buffers
the kernel (kernels/persistent_decode.py) passes activations through, and the launch. CUDA-only:
runtime/persistent_decode.py decides where it runs and builds it."""
from __future__ import annotations

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from graph.llama import LlamaModel
from kernels.persistent_decode import persistent_decode_kernel
from runtime.kv_cache import PagedKVCache
from runtime.persistent_decode import (BLOCK_K, BLOCK_N, COPIES_IN_FLIGHT, NORMS, NUM_WARPS,
                                       WEIGHTS, attention_splits, attention_tile, longest_context,
                                       ring_stages, row_chunks, rows_per_load,
                                       shared_memory_per_block, stack_layers, writers_per_block)


class PersistentDecode:
    """The step of one model and cache: stacks the weights (the model's layers keep views) and
    owns the buffers; calling it launches the kernel on a token's inputs."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, programs: int):
        c, device = model.config, model.first_device
        self.model, self.cache = model, cache
        self.grid = (programs,)
        # longer sequences decode through the per-op kernels (runtime/persistent_decode.py)
        self.longest_context = longest_context(model.config, programs)
        weights = [stack_layers(model, name) for name in WEIGHTS]
        self.norms = [stack_layers(model, name) for name in NORMS]
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0,
                                      element_bitwidth=model.dtype.itemsize * 8, rank=2)
        self.descs = [TensorDescriptor.from_tensor(w, [BLOCK_N, BLOCK_K], layout)
                      for w in (*weights, model.head)]
        H, I, nqkv = c.hidden_size, c.intermediate_size, c.q_size + 2 * c.kv_size
        slots = [writers_per_block(n, k, programs)
                 for n, k in ((nqkv, H), (H, H), (2 * I, H), (H, I))]
        heads = c.num_attention_heads
        splits = attention_splits(heads, programs)
        f32 = dict(dtype=torch.float32, device=device)
        self.buffers = [torch.empty(s * n, **f32)
                        for s, n in zip(slots, (nqkv, H, 2 * I, H))]
        # the residual entering a block, after attention's add, and attention's output; then
        # the attention chunks' partial sums and their (max, sum of exponentials)
        self.buffers += [torch.empty(H, **f32), torch.empty(H, **f32), torch.empty(H, **f32),
                         torch.empty(splits * heads * c.head_dim, **f32),
                         torch.empty(splits * heads * 2, **f32),
                         torch.zeros(heads, dtype=torch.int32, device=device)]
        self.logits = torch.empty((1, c.vocab_size), **f32)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        pool = cache.pools[0]   # the model, and so its cache, is on one device
        self.kv = (pool, pool.stride(0), pool.stride(1))
        itemsize, shared = model.dtype.itemsize, shared_memory_per_block(device)
        self.meta = dict(P=programs, H=H, NQKV=nqkv, I=I, V=c.vocab_size, NH=heads,
                         NKV=c.num_key_value_heads, D=c.head_dim, BS=cache.block_size,
                         SPLITS=splits, TILE=attention_tile(c), S_QKV=slots[0],
                         S_WO=slots[1], S_GU=slots[2], S_W2=slots[3], BN=BLOCK_N, BK=BLOCK_K,
                         STAGES=ring_stages(c, itemsize, shared, programs),
                         IN_FLIGHT=COPIES_IN_FLIGHT, ROWS=rows_per_load(c), num_warps=NUM_WARPS,
                         X_CHUNKS=row_chunks(c, programs, itemsize, shared))

    def decodes(self, seq_lens: list[int]) -> bool:
        """Whether a decode step of sequences this long is this step's: one sequence, no longer
        than longest_context (the per-op kernels are faster past it)."""
        return len(seq_lens) == 1 and seq_lens[0] <= self.longest_context

    def __call__(self, ids, positions, slots, seq_lens, table, table_stride) -> torch.Tensor:
        """One token's step: int64 device scalars (ids, positions, slots, seq_lens: one-element
        views), its block table (`table_stride` apart); returns the fp32 logits [1, vocab]."""
        m = self.model
        cos, sin = m.rope[m.first_device]
        persistent_decode_kernel[self.grid](
            *self.descs, ids, positions, slots, seq_lens, table, table_stride, m.embed,
            *self.norms, m.norm, cos, sin, *self.kv, *self.buffers, self.logits, self.counter,
            m.config.rms_norm_eps, m.scale, len(m.layers), **self.meta)
        return self.logits

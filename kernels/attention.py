"""Paged causal attention over a block-table KV cache, for prefill and decode alike.

Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1]; its KV length seq_lens[b]
already counts this step's tokens, so query row i of n sits at position seq_lens[b] - n + i.
Given this step's k and v (NewTokens), q and k are rotated and k, v written into the cache first:
at decode on the GPU inside the attention kernel itself, elsewhere by kernels.rotary."""
import torch

from .attention_decode import NewTokens, paged_decode_triton
from .attention_prefill import paged_prefill_triton
from .dispatch import use_triton
from .rotary import rotary_cache_write_ref, rotary_cache_write_triton


def _gather_kv(cache, table, length):
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    # index_select takes the int32 table as it is and costs half of advanced indexing here,
    # which matters on the CPU, where this runs twice per layer per decoded token
    return cache.index_select(0, table[:n_blocks]).flatten(0, 1)[:length]  # [length, n_kv, hd]


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                        max_query_len, scale, max_seq_len=None):
    # PyTorch's scaled_dot_product_attention: on the CPU it runs ATen's own flash kernel, which
    # (unlike einsum/bmm through oneDNN) sets nothing up per new shape -- and at decode every
    # step has a new length. GQA is expanded by the op itself.
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 when checking)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k = _gather_kv(k_cache, block_tables[b], length).to(acc).transpose(0, 1)
        v = _gather_kv(v_cache, block_tables[b], length).to(acc).transpose(0, 1)
        qb = q[lo:hi].to(acc).transpose(0, 1)
        mask = None
        if hi - lo > 1:  # query row i sits at length - n + i: causal, aligned to the end
            q_pos = torch.arange(length - (hi - lo), length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            qb[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)
        out[lo:hi] = attended[0].transpose(0, 1).to(q.dtype)
    return out


def _write_new_tokens(write, q, new: NewTokens | None, k_cache, v_cache):
    if new is not None:
        write(q, new.k, new.v, new.positions, new.cos, new.sin, k_cache, v_cache, new.slots)


def paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                           max_query_len, scale, max_seq_len=None, new=None):
    for t in (q, k_cache, v_cache):
        assert t.stride(-1) == 1, "paged_attention needs unit stride in the last dimension"
    if q.shape[0] == 0:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if max_query_len == 1:
        return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                   scale, max_seq_len, new=new)
    _write_new_tokens(rotary_cache_write_triton, q, new, k_cache, v_cache)
    return paged_prefill_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                max_query_len, scale)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    max_query_len: int, scale: float, max_seq_len=None,
                    new: NewTokens | None = None):
    """q [T, n_heads, hd]; caches [num_blocks, block_size, n_kv, hd] -> out [T, n_heads, hd].
    With new, q is taken unrotated and may be overwritten."""
    if use_triton(q):
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens,
                                      query_start_loc, max_query_len, scale, max_seq_len, new)
    _write_new_tokens(rotary_cache_write_ref, q, new, k_cache, v_cache)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               max_query_len, scale, max_seq_len)

"""Decode steps captured as CUDA graphs, one per batch-size bucket, replayed with new inputs.

A graph bakes in every tensor address and launch grid, so the inputs live in static buffers that
each step refills with one host-to-device copy, the attention grid depends only on the fixed
max_seq_len, and a batch smaller than its bucket is padded with dummy rows that write into a
scratch block reserved for them. The step ends with the logits and greedy tokens on the device.
"""
from __future__ import annotations

import torch

from graph.llama import BatchMeta, LlamaModel
from kernels.argmax import argmax
from runtime.kv_cache import PagedKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, max_batch: int = 256,
                 max_seq_len: int | None = None):
        self.model, self.cache = model, cache
        self.device = model.first_device
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        self.max_batch = self.buckets[-1]
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings,
                               cache.capacity_tokens)
        self.max_blocks = -(-self.max_seq_len // cache.block_size)
        self.scratch_block = cache.allocator.allocate(1)[0]
        self._make_buffers()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _make_buffers(self):
        n, dev = self.max_batch, self.device
        # one pinned host buffer and one device buffer: ids, positions, slots, seq_lens, tables
        self.width = 4 + self.max_blocks
        self.host = torch.zeros((n, self.width), dtype=torch.int64).pin_memory()
        self.packed = torch.zeros((n, self.width), dtype=torch.int64, device=dev)
        # the kernels want contiguous inputs: the graph's first nodes unpack `packed` into these
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _meta(self, bucket: int) -> BatchMeta:
        return BatchMeta(positions=self.positions[:bucket], slot_mapping=self.slots[:bucket],
                         block_tables=self.tables[:bucket], seq_lens=self.seq_lens[:bucket],
                         query_start_loc=self.query_start_loc[:bucket + 1], max_query_len=1,
                         max_seq_len=self.max_seq_len)

    def _unpack(self, bucket: int) -> None:
        packed = self.packed[:bucket]
        for column, buffer in enumerate((self.ids, self.positions, self.slots, self.seq_lens)):
            buffer[:bucket].copy_(packed[:, column])
        self.tables[:bucket].copy_(packed[:, 4:])

    def _step(self, bucket: int):
        self._unpack(bucket)
        hidden = self.model.forward(self.ids[:bucket], self._meta(bucket), self.cache.layers)
        logits = self.model.logits(hidden)
        return logits, argmax(logits)

    def _upload(self, bucket: int):
        self.packed[:bucket].copy_(self.host[:bucket], non_blocking=True)

    def capture(self, bucket: int) -> None:
        self._fill_padding(0, bucket)
        self._upload(bucket)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: autotuning and compilation happen outside the graph
                self._step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[bucket], self.tokens[bucket] = self._step(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = graph

    def _fill_padding(self, start: int, bucket: int) -> None:
        rows = self.host[start:bucket]
        rows.zero_()
        rows[:, 2] = self.scratch_block * self.cache.block_size
        rows[:, 3] = 1
        rows[:, 4:] = self.scratch_block

    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            seq_lens: list[int], tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for len(token_ids) sequences: (logits [B, vocab], greedy [B])."""
        batch = len(token_ids)
        bucket = self.bucket_for(batch)
        if bucket not in self.graphs:
            self.capture(bucket)
        host = self.host
        host[:batch, 0] = torch.tensor(token_ids)
        host[:batch, 1] = torch.tensor(positions)
        host[:batch, 2] = torch.tensor(slots)
        host[:batch, 3] = torch.tensor(seq_lens)
        for row, table in enumerate(tables):
            host[row, 4:4 + len(table)] = torch.tensor(table)
        self._fill_padding(batch, bucket)
        self._upload(bucket)
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch], self.tokens[bucket][:batch]

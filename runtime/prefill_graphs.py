"""Prefill of one prompt captured as CUDA graphs, one per token-count bucket.

An eager prefill launches ~10 Triton kernels per layer, and for a small model the host needs
longer to launch them than the GPU to run them. A graph per bucket (64 .. 2048 tokens) replays
them in one go. The prompt is padded to its bucket: the padded rows belong to no sequence
(query_start_loc ends at the real length, so attention skips them), their cache slot is -1 (the
rotary kernel writes nothing for them), and every other op works row by row, so they never
touch the real rows. The attention grid is sized by the bucket, its programs past the prompt
exit early.
"""
from __future__ import annotations

import torch

from graph.llama import BatchMeta, LlamaModel
from kernels.argmax import argmax
from runtime.kv_cache import PagedKVCache

BUCKETS = (64, 128, 256, 512, 1024, 2048)
IDS, POSITIONS, SLOTS = 0, 1, 2          # rows of the per-token input
SEQ_LEN, LAST_ROW, TABLE = 0, 1, 2       # entries of the per-sequence input


class PrefillGraphs:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, max_seq_len: int):
        self.model, self.cache = model, cache
        self.device = model.first_device
        self.max_seq_len = max_seq_len
        self.buckets = [b for b in BUCKETS if b <= max_seq_len]
        rows = self.buckets[-1] if self.buckets else 0
        max_blocks = -(-max_seq_len // cache.block_size)
        self.host_tokens = torch.zeros((3, rows), dtype=torch.int64).pin_memory()
        self.host_seq = torch.zeros(TABLE + max_blocks, dtype=torch.int64).pin_memory()
        self.tokens_np, self.seq_np = self.host_tokens.numpy(), self.host_seq.numpy()
        dev = self.device
        self.tokens = torch.zeros((3, rows), dtype=torch.int64, device=dev)
        self.seq = torch.zeros(TABLE + max_blocks, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
        self.table = torch.zeros((1, max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.zeros(2, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.uploaded = torch.cuda.Event()  # the last copy out of the pinned host buffers

    def bucket_for(self, tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= tokens), None)

    def _step(self, bucket: int):
        self.seq_lens.copy_(self.seq[SEQ_LEN:SEQ_LEN + 1])
        self.query_start_loc[1:].copy_(self.seq[LAST_ROW:LAST_ROW + 1] + 1)
        self.table.copy_(self.seq[None, TABLE:])
        ids, positions, slots = (self.tokens[r, :bucket] for r in (IDS, POSITIONS, SLOTS))
        meta = BatchMeta(positions=positions, slot_mapping=slots,
                         block_tables=self.table, seq_lens=self.seq_lens,
                         query_start_loc=self.query_start_loc, max_query_len=bucket,
                         max_seq_len=self.max_seq_len)
        hidden = self.model.forward(ids, meta, self.cache.layers)
        logits = self.model.logits(hidden[self.seq[LAST_ROW:LAST_ROW + 1]])
        return logits, argmax(logits)

    def _capture(self, bucket: int) -> None:
        self._fill([0], [0], [-1], 1, [self.cache.num_blocks - 1], bucket)
        self._upload()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: autotuning and compilation happen outside the graph
                self._step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, tokens = self._step(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, logits, tokens)

    def _fill(self, ids, positions, slots, seq_len, table, bucket) -> None:
        # the previous step's copy may still be queued behind its replay: a caller that does
        # not read the results between steps would otherwise have it upload this step's data
        self.uploaded.synchronize()
        n = len(ids)
        tokens = self.tokens_np
        tokens[IDS, :n], tokens[POSITIONS, :n], tokens[SLOTS, :n] = ids, positions, slots
        tokens[IDS, n:bucket], tokens[POSITIONS, n:bucket], tokens[SLOTS, n:bucket] = 0, 0, -1
        self.seq_np[SEQ_LEN], self.seq_np[LAST_ROW] = seq_len, n - 1
        self.seq_np[TABLE:TABLE + len(table)] = table

    def _upload(self) -> None:
        self.tokens.copy_(self.host_tokens, non_blocking=True)
        self.seq.copy_(self.host_seq, non_blocking=True)
        self.uploaded.record(torch.cuda.current_stream(self.device))

    def run(self, ids: list[int], positions: list[int], slots: list[int], seq_len: int,
            table: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill (a chunk of) one sequence: (logits [1, vocab], greedy [1]) of its last row."""
        bucket = self.bucket_for(len(ids))
        if bucket not in self.graphs:
            self._capture(bucket)
        self._fill(ids, positions, slots, seq_len, table, bucket)
        self._upload()
        graph, logits, tokens = self.graphs[bucket]
        graph.replay()
        return logits, tokens


"""Decode steps captured as CUDA graphs, one per batch-size bucket, replayed with new inputs.

A graph bakes in every tensor address and launch grid, so the inputs live in static buffers that
each step refills with one host-to-device copy per device (of the block-table columns in use
only: the tables are as wide as the longest context, 8192 blocks at 128k tokens). The kernels
read that packed buffer in place, the block table as a transposed view. The attention grid
depends only on the fixed max_seq_len, and a batch smaller than its bucket is padded with dummy
rows that write into a scratch block reserved for them. A model split over several GPUs gets one
graph per device segment; the hidden state crosses between segments as a copy between replays.
The last segment ends with the logits and the greedy tokens on the device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from graph.llama import BatchMeta, LlamaModel
from kernels.argmax import argmax
from runtime.kv_cache import PagedKVCache
from runtime.prefill_graphs import PrefillGraphs

if TYPE_CHECKING:  # Gluon, imported for real only where the step is built
    from runtime.persistent_step import PersistentDecode

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IDS, POSITIONS, SLOTS, SEQ_LENS, TABLES = 0, 1, 2, 3, 4   # rows of the packed input


class _DeviceInputs:
    """One device's static copy of the step inputs, [field, sequence]: ids, positions, slots,
    lengths, then one row per block-table column, so the columns a step uses are one contiguous
    prefix of it. The kernels read it where it is (no unpacking copies inside the graph)."""

    def __init__(self, device: torch.device, rows: int, width: int):
        self.packed = torch.zeros((width, rows), dtype=torch.int64, device=device)
        self.packed[SEQ_LENS] = 1
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)

    def ids(self, bucket: int) -> torch.Tensor:
        return self.packed[IDS, :bucket]

    def meta(self, bucket: int, max_seq_len: int) -> BatchMeta:
        packed = self.packed[:, :bucket]
        return BatchMeta(positions=packed[POSITIONS], slot_mapping=packed[SLOTS],
                         block_tables=packed[TABLES:].t(), seq_lens=packed[SEQ_LENS],
                         query_start_loc=self.query_start_loc[:bucket + 1], max_query_len=1,
                         max_seq_len=max_seq_len)


class _BucketGraphs:
    """The graphs of one batch bucket: one per segment, with the tensors that link them."""

    def __init__(self):
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.inputs: list[tuple[torch.Tensor, torch.Tensor] | None] = []   # hidden, residual
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.logits: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, max_batch: int = 256,
                 max_seq_len: int | None = None, persistent: PersistentDecode | None = None):
        self.model, self.cache = model, cache
        self.persistent = persistent   # bucket 1's step as one launch, where it runs
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        self.max_batch = self.buckets[-1]
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings,
                               cache.capacity_tokens)
        max_blocks = -(-self.max_seq_len // cache.block_size)
        self.scratch_block = cache.allocator.allocate(1)[0]
        width = TABLES + max_blocks
        self.host = torch.zeros((width, self.max_batch), dtype=torch.int64).pin_memory()
        self.host_np = self.host.numpy()   # numpy writes cost far less per step than torch's
        self.inputs = {d: _DeviceInputs(d, self.max_batch, width) for d in model.devices}
        self.by_bucket: dict[int, _BucketGraphs] = {}
        # batch 1 up to the persistent step's longest context: that step alone, one launch
        self.persistent_graph: _BucketGraphs | None = None
        self.last_replayed: _BucketGraphs | None = None   # the graphs of the latest step
        # one per device: the last copy out of self.host, which the next step must not overwrite
        # before it has run (a caller need not read the results between steps)
        self.uploaded = {d: torch.cuda.Event() for d in model.devices}
        self.pools: dict[torch.device, object] = {}
        # one prompt's prefill as a graph too, where the model is in one segment
        self.prefill = (PrefillGraphs(model, cache, self.max_seq_len)
                        if len(model.segments) == 1 else None)

    def run_batch(self, ids, positions, slots, seq_lens, tables, query_lens):
        """The step as a graph where one fits: every sequence decoding one token, or a single
        sequence prefilling up to the largest prefill bucket. None: run it eagerly."""
        if max(query_lens) == 1 and self.bucket_for(len(ids)) is not None:
            return self.run(ids, positions, slots, seq_lens, tables)
        if len(query_lens) == 1 and self.prefill is not None \
                and self.prefill.bucket_for(len(ids)) is not None:
            return self.prefill.run(ids, positions, slots, seq_lens[0], tables[0])
        return None

    @property
    def graphs(self) -> dict[int, _BucketGraphs]:
        return self.by_bucket

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    # ---- capture -----------------------------------------------------------------------
    def _segment_step(self, bucket, index, hidden, residual, persistent=False):
        """The work of segment `index`: (embed), its layers, (norm + head); or, where
        `persistent`, the whole batch-1 step as one launch."""
        device, start, end = self.model.segments[index]
        inputs = self.inputs[device]
        if persistent:   # the model is one segment then
            packed = inputs.packed
            logits = self.persistent(*packed[:TABLES, :1], packed[TABLES:, 0], packed.stride(0))
            return None, None, (logits, argmax(logits))
        if index == 0:
            hidden = self.model.embed_tokens(inputs.ids(bucket))
        hidden, residual = self.model.run_layers(start, end, hidden, residual,
                                                 inputs.meta(bucket, self.max_seq_len),
                                                 self.cache.layers)
        if index < len(self.model.segments) - 1:
            return hidden, residual, None
        logits = self.model.logits(self.model.final_norm(hidden, residual))
        return hidden, residual, (logits, argmax(logits))

    def capture(self, bucket: int, persistent: bool = False) -> None:
        self._wait_for_uploads()
        self._fill_padding(0, bucket)
        self._upload(self.host.shape[0])
        made = _BucketGraphs()
        hidden = residual = None
        for index, (device, _, _) in enumerate(self.model.segments):
            if index:
                hidden, residual = hidden.to(device).clone(), residual.to(device).clone()
            made.inputs.append((hidden, residual) if index else None)
            hidden, residual, head = self._capture_segment(made, bucket, index, hidden, residual,
                                                           persistent)
            made.outputs.append((hidden, residual))
            if head is not None:
                made.logits, made.tokens = head
        if persistent:
            self.persistent_graph = made
        else:
            self.by_bucket[bucket] = made

    def _capture_segment(self, made, bucket, index, hidden, residual, persistent):
        device = self.model.segments[index][0]
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: autotuning and compilation happen outside graphs
                    self._segment_step(bucket, index, hidden, residual, persistent)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pools.get(device)):
                result = self._segment_step(bucket, index, hidden, residual, persistent)
            self.pools[device] = graph.pool()
        made.graphs.append(graph)
        return result

    # ---- replay ------------------------------------------------------------------------
    def _wait_for_uploads(self) -> None:
        for event in self.uploaded.values():
            event.synchronize()

    def _fill_padding(self, start: int, bucket: int) -> None:
        # a padding row has length 1: attention reads its first table entry and nothing more
        rows = self.host_np[:TABLES + 1, start:bucket]
        rows[:] = 0
        rows[SLOTS] = self.scratch_block * self.cache.block_size
        rows[SEQ_LENS] = 1
        rows[TABLES] = self.scratch_block

    def _upload(self, fields: int) -> None:
        """Copy the first `fields` rows of the packed input: table columns past the longest
        table of this step are stale on the device, and no kernel reads them."""
        for device, inputs in self.inputs.items():
            inputs.packed[:fields].copy_(self.host[:fields], non_blocking=True)
            self.uploaded[device].record(torch.cuda.current_stream(device))

    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int],
            seq_lens: list[int], tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for len(token_ids) sequences: (logits [B, vocab], greedy [B]).
        token_ids may be a tensor on the device (the tokens of the step before, not yet read)."""
        batch = len(token_ids)
        bucket = self.bucket_for(batch)
        persistent = self.persistent is not None and self.persistent.decodes(seq_lens)
        if persistent and self.persistent_graph is None:
            self.capture(bucket, persistent=True)
        if bucket not in self.by_bucket:   # now, not when a sequence first outgrows the step
            self.capture(bucket)
        self._wait_for_uploads()
        host = self.host_np
        on_device = isinstance(token_ids, torch.Tensor)   # a launched step's tokens
        if not on_device:
            host[IDS, :batch] = token_ids
        host[POSITIONS, :batch] = positions
        host[SLOTS, :batch] = slots
        host[SEQ_LENS, :batch] = seq_lens
        for row, table in enumerate(tables):
            host[TABLES:TABLES + len(table), row] = table
        self._fill_padding(batch, bucket)
        self._upload(TABLES + max(1, max(map(len, tables))))
        if on_device:   # queued after the upload, which wrote this row from the host
            self.inputs[self.model.first_device].packed[IDS, :batch].copy_(token_ids)
        made = self.persistent_graph if persistent else self.by_bucket[bucket]
        self.last_replayed = made
        for index, graph in enumerate(made.graphs):
            if index:
                (hidden, residual), (prev_h, prev_r) = made.inputs[index], made.outputs[index - 1]
                hidden.copy_(prev_h, non_blocking=True)
                residual.copy_(prev_r, non_blocking=True)
            graph.replay()
        return made.logits[:batch], made.tokens[:batch]

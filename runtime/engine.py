"""Running the model over batches of sequences on the paged cache.

One step is one forward over a flattened batch: every sequence contributes its new tokens (the
whole prompt at prefill, one token at decode) and reads its own history through its block table.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from graph.llama import BatchMeta, LlamaModel
from kernels.argmax import argmax
from kernels.dispatch import use_triton
from runtime.kv_cache import PagedKVCache, SequenceBlocks
from runtime.launched_step import LaunchedStep
from runtime.persistent_decode import make_persistent_decode
from runtime.sampler import SamplingParams, all_plain_greedy, sample

if TYPE_CHECKING:  # imported for real only where graphs or the step are made (CUDA-only code)
    from runtime.cuda_graphs import DecodeGraphs
    from runtime.persistent_step import PersistentDecode


def make_decode_graphs(model: LlamaModel, cache: PagedKVCache,
                       persistent: "PersistentDecode | None" = None) -> "DecodeGraphs | None":
    """CUDA graphs for decode when every layer sits on a GPU and runs Triton kernels."""
    if not all(use_triton(torch.empty(0, device=d)) for d in model.devices):
        return None
    from runtime.cuda_graphs import DecodeGraphs
    return DecodeGraphs(model, cache, persistent=persistent)


def make_engine(model: LlamaModel, cache: PagedKVCache, eos_ids: list[int],
                cuda_graphs: bool = True) -> "Engine":
    """The engine with its decode steps: the persistent batch-1 step where it is switched on and
    can run (graphed or not; runtime/persistent_decode.py), CUDA graphs where asked and possible."""
    persistent = make_persistent_decode(model, cache)
    graphs = make_decode_graphs(model, cache, persistent) if cuda_graphs else None
    return Engine(model, cache, eos_ids, graphs, persistent)


def make_readback(device: torch.device):
    """Where launched steps' tokens come back to the host without a device-wide wait."""
    if device.type != "cuda":
        return None
    from runtime.token_readback import TokenReadback
    return TokenReadback(device)


class PromptTooLongError(ValueError):
    """A prompt that does not fit the model's context."""


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    generator: torch.Generator | None = None
    finish_reason: str | None = None   # "stop" (EOS or stop string) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_known(self) -> int:
        """Prompt plus generated tokens: what the cache must hold before the next sample."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a decode step reads one token)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return (self.prompt_ids + self.output_ids)[start:end]


class Engine:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, eos_ids: list[int],
                 graphs: "DecodeGraphs | None" = None,
                 persistent: "PersistentDecode | None" = None):
        self.model = model
        self.cache = cache
        self.graphs = graphs
        self.persistent = persistent   # batch-1 decode as one launch, where it runs
        self.eos_ids = set(eos_ids)
        self.context = model.config.max_position_embeddings
        self.readback = make_readback(model.last_device)

    # ---- one forward over a batch -------------------------------------------------------
    def forward(self, seqs: list[Sequence], new_tokens: list[list[int]],
                all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append new_tokens[i] to seqs[i] and run them. Returns float32 logits (the last row of
        each sequence [B, vocab], or every row [T, vocab] when all_logits) and, when the step ran
        as a CUDA graph, its greedy tokens [B] (else None). A graph's outputs are its static
        buffers: they hold this step's values until the next step runs."""
        batch = self._gather(seqs, new_tokens)
        ran = None if all_logits else self._run_graph(seqs, batch)
        return ran or (self._forward_eager(seqs, batch, all_logits), None)

    def launch_decode(self, seqs: list[Sequence], token_ids: list[int] | None = None,
                      after: LaunchedStep | None = None, rows: list[int] | None = None,
                      ) -> LaunchedStep:
        """Start a greedy decode step of one token per sequence and return without waiting for
        it. The input tokens are token_ids, or the tokens of the launched step `after` at `rows`,
        taken on the device: the host need not have read them."""
        batch = self._gather(seqs, [[0]] * len(seqs))
        batch["ids"] = token_ids if after is None else after.select(rows)
        ran = self._run_graph(seqs, batch)
        greedy = ran[1] if ran else argmax(self._forward_eager(seqs, batch, all_logits=False))
        return LaunchedStep(greedy, self.readback.start(greedy) if self.readback else None)

    def _run_graph(self, seqs, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, greedy) from a CUDA graph, or None where no graph fits this step."""
        if self.graphs is None:
            return None
        starts = batch["starts"]
        return self.graphs.run_batch(batch["ids"], batch["positions"], batch["slots"],
                                     batch["lens"], [s.blocks.blocks for s in seqs],
                                     [b - a for a, b in zip(starts, starts[1:])])

    def _gather(self, seqs, new_tokens) -> dict:
        ids, positions, slots, starts, lens = [], [], [], [0], []
        for seq, tokens in zip(seqs, new_tokens):
            first = seq.blocks.num_tokens
            slots += self.cache.reserve(seq.blocks, len(tokens))
            ids += tokens
            positions += range(first, first + len(tokens))
            starts.append(starts[-1] + len(tokens))
            lens.append(seq.blocks.num_tokens)
        return dict(ids=ids, positions=positions, slots=slots, starts=starts, lens=lens,
                    max_query_len=max(len(t) for t in new_tokens))

    def _forward_eager(self, seqs, batch, all_logits) -> torch.Tensor:
        if self.persistent is not None and batch["max_query_len"] == 1 \
                and self.persistent.decodes(batch["lens"]):
            return self._persistent_step(seqs[0], batch)
        device = self.model.first_device
        width = max(len(s.blocks.blocks) for s in seqs)
        tables = [s.blocks.blocks + [0] * (width - len(s.blocks.blocks)) for s in seqs]
        meta = BatchMeta(
            positions=torch.tensor(batch["positions"], dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(batch["slots"], dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(batch["lens"], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(batch["starts"], dtype=torch.int32, device=device),
            max_query_len=batch["max_query_len"],
            max_seq_len=max(batch["lens"]))
        input_ids = batch["ids"]   # a list, or a launched step's tokens on its device
        input_ids = (input_ids.to(device) if isinstance(input_ids, torch.Tensor)
                     else torch.tensor(input_ids, dtype=torch.int64, device=device))
        hidden = self.model.forward(input_ids, meta, self.cache.layers)
        if not all_logits:
            last_rows = torch.tensor(batch["starts"][1:], device=hidden.device) - 1
            hidden = hidden[last_rows]
        return self.model.logits(hidden)

    def _persistent_step(self, seq, batch) -> torch.Tensor:
        """One sequence's decode token as one launch: the inputs go up as one int64 row."""
        ids = batch["ids"]   # a list, or a launched step's token on the device
        on_device = isinstance(ids, torch.Tensor)
        row = [0 if on_device else ids[0], batch["positions"][0], batch["slots"][0],
               batch["lens"][0], *seq.blocks.blocks]
        packed = torch.tensor(row, dtype=torch.int64).to(self.model.first_device)
        if on_device:
            packed[:1].copy_(ids.reshape(-1)[:1])
        # a copy: the step's own buffer is rewritten by the next step
        return self.persistent(*packed[:4].split(1), packed[4:], 1).clone()

    # ---- generation --------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty: at least one token is needed")
        if len(prompt_ids) >= self.context:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context}")

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        self.check_prompt(prompt_ids)
        return Sequence(list(prompt_ids), params,
                        generator=params.make_generator(self.model.last_device))

    def generate(self, seqs: list[Sequence]) -> Iterator[list[tuple[Sequence, int]]]:
        """Prefill all prompts in one step, then decode them together. Yields each step's new
        (sequence, token) pairs; the caller may finish a sequence (stop string) between steps."""
        try:
            step_seqs, step_tokens = seqs, [s.prompt_ids for s in seqs]
            while step_seqs:
                logits, greedy = self.forward(step_seqs, step_tokens)
                params = [s.params for s in step_seqs]
                if greedy is None or not all_plain_greedy(params):
                    greedy = sample(logits, params, [s.all_ids for s in step_seqs],
                                    [s.generator for s in step_seqs])
                chosen = greedy.tolist()
                yield [self._append(seq, token) for seq, token in zip(step_seqs, chosen)]
                step_seqs = [s for s in step_seqs if not s.finished]
                step_tokens = [[s.output_ids[-1]] for s in step_seqs]
        finally:
            for seq in seqs:
                self.finish(seq, seq.finish_reason or "abort")

    def _append(self, seq: Sequence, token: int) -> tuple[Sequence, int]:
        seq.output_ids.append(token)
        if token in self.eos_ids or token in seq.params.stop_token_ids:
            self.finish(seq, "stop")
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_known >= self.context:
            self.finish(seq, "length")
        return seq, token

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq done and give its blocks back to the cache."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
        self.cache.release(seq.blocks)

    def prefill_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position of one prompt, float32 [n, vocab]."""
        seq = self.new_sequence(token_ids, SamplingParams())
        try:
            return self.forward([seq], [seq.prompt_ids], all_logits=True)[0]
        finally:
            self.cache.release(seq.blocks)

"""Continuous batching: many requests share the paged cache and the model, step by step.

Requests wait in `waiting`; each step first continues the `running` ones (oldest first: decodes
and the next chunk of a long prompt), then admits waiting ones while the per-step token budget,
max_num_seqs and the free KV blocks allow. All of it runs as one Engine.forward. A sequence is
sampled only when the step reached the end of its known tokens (not after a mid-prompt chunk).
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks go back and it returns to the front of `waiting`, to be recomputed later
from its prompt plus the tokens it already generated (which it keeps).

Lookahead (on by default on CUDA): while every running sequence decodes greedily and nothing
waits to join, decode step N+1 is launched before the tokens of step N are read, with step N's
tokens as its input on the device. The host's scheduling then overlaps the GPU's work instead of
leaving it idle. A sequence that turns out to have ended at step N (EOS, a stop token, the caller)
wastes its row of step N+1, whose token is dropped; a sequence that ends by length is left out.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from runtime.engine import Engine, Sequence
from runtime.kv_cache import OutOfBlocksError
from runtime.launched_step import LaunchedStep
from runtime.sampler import all_plain_greedy, sample

CUDA_TOKEN_BUDGET = 8192   # enough to keep the GPU's GEMMs busy during prefill
CPU_TOKEN_BUDGET = 512     # keeps a CPU step short, so decodes are not stalled for long


class Scheduler:
    def __init__(self, engine: Engine, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int = 256, prefix_caching: bool = True,
                 lookahead: bool | None = None):
        if max_num_batched_tokens is None:
            on_cuda = engine.model.first_device.type == "cuda"
            max_num_batched_tokens = CUDA_TOKEN_BUDGET if on_cuda else CPU_TOKEN_BUDGET
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.engine, self.cache = engine, engine.cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.prefix_caching = prefix_caching
        # on the CPU a step is done when its launch returns: nothing to overlap
        self.lookahead = (engine.model.first_device.type == "cuda" if lookahead is None
                          else lookahead)
        self.launched: tuple[list[Sequence], LaunchedStep] | None = None   # not yet read
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0     # prompt tokens taken from shared blocks, not computed
        self.peak_blocks_in_use = 0

    # ---- requests in and out -----------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        """Queue a new sequence (from Engine.new_sequence); it joins at the next step."""
        need = self.cache.blocks_for(len(seq.prompt_ids))
        if need > self.cache.num_blocks:
            raise OutOfBlocksError(
                f"KV cache out of blocks: the prompt of {len(seq.prompt_ids)} tokens needs "
                f"{need} blocks, the cache holds {self.cache.num_blocks}; raise kv_cache_tokens")
        self.waiting.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """End seq now (a stop string, a client gone) and give its blocks back."""
        self.engine.finish(seq, reason)
        self._drop_finished()

    def abort_all(self) -> None:
        self.launched = None   # its device work writes only into blocks given back below
        for seq in [*self.running, *self.waiting]:
            self.engine.finish(seq, seq.finish_reason or "abort")
        self.running.clear()
        self.waiting.clear()

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def run(self) -> Iterator[list[tuple[Sequence, int]]]:
        """Step until every request is done, yielding each step's (sequence, new token) pairs.
        Requests may be added or finished between steps; leaving early aborts the rest."""
        try:
            while self.has_unfinished:
                yield self.step()
        finally:
            self.abort_all()

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, int]]:
        self._drop_finished()
        if self.launched is not None:
            return self._read_launched()
        seqs, tokens = self.schedule()
        if not seqs:
            return []
        try:
            if self._launchable(seqs):
                self.launched = seqs, self.engine.launch_decode(seqs, [t[0] for t in tokens])
                return self._read_launched()
            logits, greedy = self.engine.forward(seqs, tokens)
        except BaseException:
            # blocks registered for sharing this step may hold nothing valid now
            self.cache.allocator.clear_cache()
            raise
        done = [i for i, s in enumerate(seqs) if s.blocks.num_tokens == s.num_known]
        chosen = self._sample(logits, greedy, [seqs[i] for i in done], done, len(seqs))
        out = [self.engine._append(seqs[i], token) for i, token in zip(done, chosen)]
        self._drop_finished()
        return out

    def _sample(self, logits, greedy, seqs, rows, batch) -> list[int]:
        if not seqs:
            return []
        params = [s.params for s in seqs]
        if len(rows) < batch:   # a one-token step may hold a mid-prompt chunk of one token
            logits = logits[rows]
            greedy = greedy[rows] if greedy is not None else None
        if greedy is not None and all_plain_greedy(params):
            return greedy.tolist()   # a CUDA-graph step computed them already
        histories = [s.all_ids if s.params.repetition_penalty != 1.0 else [] for s in seqs]
        return sample(logits, params, histories, [s.generator for s in seqs]).tolist()

    # ---- lookahead: decode launched one step ahead of reading ----------------------------
    def _launchable(self, seqs) -> bool:
        """A lookahead step: every sequence decodes its last known token (one pending token
        means a one-token slice), greedily."""
        return (self.lookahead and all(self._pending(s) == 1 for s in seqs)
                and all_plain_greedy([s.params for s in seqs]))

    def _read_launched(self) -> list[tuple[Sequence, int]]:
        """Launch the next decode step on the launched one's tokens where it may go on, then
        read the launched step and append its tokens."""
        seqs, launched = self.launched
        self.launched = None
        rows = self._going_on(seqs)
        if rows:
            ahead = [seqs[i] for i in rows]
            self.launched = ahead, self.engine.launch_decode(ahead, after=launched, rows=rows)
            self._note_blocks_in_use()
        out = []
        for seq, token in zip(seqs, launched.read()):
            if seq.finished:   # by the caller, or by EOS while this step ran ahead
                continue
            out.append(self.engine._append(seq, token))
            self._register_written(seq)
        if self.launched is not None and all(s.finished for s in self.launched[0]):
            self.launched = None
        self._drop_finished()
        return out

    def _going_on(self, seqs: list[Sequence]) -> list[int]:
        """Rows of seqs that decode again after the launched step, if the next step may be
        launched before its tokens are read: nothing waits to join, no sequence needs
        preempting, and the row does not end by length with the token being read."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return []
        context = self.engine.context
        rows = [i for i, s in enumerate(seqs) if not s.finished
                and len(s.output_ids) + 1 < s.params.max_new_tokens
                and s.num_known + 1 < context]
        need = sum(self.cache.blocks_needed(seqs[i].blocks, 1) for i in rows)
        return rows if need <= self.cache.allocator.num_free else []

    def _register_written(self, seq: Sequence) -> None:
        """Offer the blocks a step ahead filled, now that the tokens in them are known."""
        if (self.prefix_caching and not seq.finished
                and seq.blocks.num_tokens // self.cache.block_size > len(seq.blocks.hashes)):
            self.cache.register_full_blocks(seq.blocks, seq.all_ids, seq.blocks.num_tokens)

    def _note_blocks_in_use(self) -> None:
        in_use = self.cache.num_blocks - self.cache.allocator.num_free
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, in_use)

    def _drop_finished(self) -> None:
        if any(s.finished for s in self.running):
            self.running = [s for s in self.running if not s.finished]
        if any(s.finished for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.finished)

    # ---- choosing the batch ------------------------------------------------------------
    def schedule(self) -> tuple[list[Sequence], list[list[int]]]:
        """This step's sequences and their new tokens; their blocks are already allocated."""
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= sum(n for _, n in batch)
        if not preempted:
            self._admit_waiting(batch, budget)
        self._note_blocks_in_use()
        seqs = [s for s, _ in batch]
        tokens = [s.token_slice(s.blocks.num_tokens, s.blocks.num_tokens + n) for s, n in batch]
        return seqs, tokens

    def _pending(self, seq: Sequence) -> int:
        return seq.num_known - seq.blocks.num_tokens

    def _schedule_running(self, batch, budget) -> bool:
        preempted, i = False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(self._pending(seq), budget)
            while self.cache.blocks_needed(seq.blocks, n) > self.cache.allocator.num_free:
                victim = self.running[-1]
                if victim is seq and i == 0:
                    raise self._alone_error(seq, n)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return True
            self._take(seq, n, batch)
            budget -= n
            i += 1
        return preempted

    def _admit_waiting(self, batch, budget) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.prefix_caching and not seq.blocks.blocks:
                self.num_cached_tokens += self.cache.share_prefix(seq.blocks, seq.all_ids)
            n = min(self._pending(seq), budget)
            if self.cache.blocks_needed(seq.blocks, n) > self.cache.allocator.num_free:
                if not batch:
                    raise self._alone_error(seq, n)
                self.num_cached_tokens -= seq.blocks.num_tokens
                self.cache.release(seq.blocks)   # waits without holding shared blocks
                return
            self.waiting.popleft()
            self.running.append(seq)
            self._take(seq, n, batch)
            budget -= n

    def _take(self, seq: Sequence, n: int, batch) -> None:
        self.cache.grow(seq.blocks, n)
        upto = seq.blocks.num_tokens + n
        if self.prefix_caching and upto // self.cache.block_size > len(seq.blocks.hashes):
            # Registered before the forward that fills them: a sequence admitted later in this
            # same step may share them, since every layer writes this step's K/V before any
            # query of the step reads the cache.
            self.cache.register_full_blocks(seq.blocks, seq.all_ids, upto)
        batch.append((seq, n))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.blocks)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _alone_error(self, seq: Sequence, n: int) -> OutOfBlocksError:
        need = self.cache.blocks_needed(seq.blocks, n)
        free = self.cache.allocator.num_free
        return OutOfBlocksError(
            f"KV cache out of blocks: a request at {seq.blocks.num_tokens + n} tokens needs "
            f"{need} more blocks, {free} free of {self.cache.num_blocks} and nothing left to "
            f"preempt; raise kv_cache_tokens or shorten the request")

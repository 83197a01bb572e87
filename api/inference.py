"""LlamaGenerator: load a model once, then generate text, stream it, or read logits."""
from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from api.model_source import resolve_model_dir
from api.stop_text import StopTextFilter
from graph.config import parse_dtype
from graph.llama import LlamaModel
from runtime.engine import Sequence, make_engine
from runtime.kv_cache import PagedKVCache
from runtime.kv_budget import default_kv_cache_tokens
from runtime.placement import parse_device, split_layers
from runtime.progress import ProgressBar
from runtime.sampler import SamplingParams
from runtime.scheduler import Scheduler
from utils.chat_template import end_of_turn_ids, render_for_tokenizer
from utils.checkpoint import load_native
from utils.tokenizer import Tokenizer

BLOCK_SIZE = 16
_said_cpu_fallback = False


def _pick_device(device: str | None) -> torch.device:
    global _said_cpu_fallback
    if device is not None:
        return parse_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not _said_cpu_fallback:
        print("llama-triton: no CUDA device found; running the PyTorch fallback on the CPU",
              file=sys.stderr)
        _said_cpu_fallback = True
    return torch.device("cpu")


class LlamaGenerator:
    def __init__(self, path: str | None = None, fmt: str = "triton", device: str | None = None,
                 dtype: str | torch.dtype | None = None, devices: list[str] | None = None,
                 kv_cache_tokens: int | None = None, split: list[int] | str | None = None,
                 cuda_graphs: bool = True, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int = 256, lookahead: bool | None = None):
        model_dir = resolve_model_dir(path, fmt)
        if devices:
            placed = [parse_device(d) for d in devices]
        else:
            placed = [_pick_device(device)]
        config, state_dict = load_native(model_dir)
        if dtype is None:
            dtype = config.torch_dtype if placed[0].type == "cuda" else "float32"
        self.dtype = parse_dtype(dtype)
        self.config = config
        self.model_dir = model_dir
        self.tokenizer = Tokenizer.from_dir(model_dir, config)
        layer_devices = split_layers(config.num_hidden_layers, placed, split)
        self.model = LlamaModel(config, state_dict, layer_devices, self.dtype)
        del state_dict
        tokens = kv_cache_tokens or default_kv_cache_tokens(config, self.dtype, layer_devices)
        if tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}")
        self.cache = PagedKVCache(-(-tokens // BLOCK_SIZE), BLOCK_SIZE, config.num_key_value_heads,
                                  config.head_dim, self.dtype, layer_devices)
        self.engine = make_engine(self.model, self.cache, self.tokenizer.eos_ids, cuda_graphs)
        self.scheduler_options = dict(max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs, lookahead=lookahead)
        self.new_scheduler()   # refuses bad options now rather than at the first request

    @property
    def device(self) -> torch.device:
        return self.model.first_device

    def new_scheduler(self) -> Scheduler:
        """A scheduler over this generator's engine; the KV cache, and with it the blocks of
        earlier prompts kept for prefix sharing, is the same for all of them."""
        return Scheduler(self.engine, **self.scheduler_options)

    # ---- text in, text out ---------------------------------------------------------------
    def generate(self, prompt: str | list[str], max_new_tokens: int = 16,
                 sampling: list[dict | SamplingParams] | None = None,
                 progress: bool | None = None, **shared) -> str | list[str]:
        """Completion text for one prompt, or a list of completions for a list of prompts.

        All prompts run together through the scheduler (continuous batching, long prompts in
        chunks, common prefixes computed once). The keyword arguments (temperature, top_k,
        top_p, min_p, repetition_penalty, seed, stop, stop_token_ids) apply to every prompt;
        `sampling` gives each prompt its own: one entry per prompt, either a dict of those
        fields overriding the shared ones (max_new_tokens included) or a SamplingParams used
        as it is. Example: generate(["a", "b"], sampling=[{}, {"temperature": 0.8, "seed": 1}]).
        `progress` draws a bar on stderr; by default only for 8 or more prompts on a terminal.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        params = per_request_params(len(prompts), sampling,
                                    dict(max_new_tokens=max_new_tokens, **shared))
        seqs = [self.engine.new_sequence(self.tokenizer.encode(p), sp)
                for p, sp in zip(prompts, params)]
        texts = self._run_text(seqs, ProgressBar(len(seqs), enabled=progress))
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 16, **sampling) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as tokens arrive."""
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        seq = self.engine.new_sequence(self.tokenizer.encode(prompt), params)
        yield from self._stream_seq(seq)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling) -> str:
        """The assistant's reply to a conversation, rendered with the model's chat template."""
        return "".join(self.chat_stream(messages, max_new_tokens, **sampling))

    def chat_stream(self, messages: list[dict], max_new_tokens: int = 256,
                    **sampling) -> Iterator[str]:
        """chat(), piece by piece; stops at the template's end-of-turn token."""
        text = render_for_tokenizer(self.tokenizer, messages)
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        params.stop_token_ids = end_of_turn_ids(self.tokenizer)
        seq = self.engine.new_sequence(self.tokenizer.encode(text, add_bos=False), params)
        yield from self._stream_seq(seq)

    def _run_text(self, seqs: list[Sequence], bar: ProgressBar) -> list[str]:
        decoders = [self.tokenizer.stream_decoder() for _ in seqs]
        filters = [StopTextFilter(s.params.stop) for s in seqs]
        texts = [""] * len(seqs)
        index = {id(s): i for i, s in enumerate(seqs)}
        scheduler, finished = self.new_scheduler(), 0
        for seq in seqs:
            scheduler.add(seq)
        for step in scheduler.run():
            for seq, token in step:
                i = index[id(seq)]
                texts[i] += self._emit(scheduler, seq, token, decoders[i], filters[i])
                finished += seq.finished
            bar.update(finished, len(step))
        bar.close()
        for i in range(len(seqs)):
            texts[i] += filters[i].push(decoders[i].flush()) + filters[i].flush()
        return texts

    def _stream_seq(self, seq: Sequence) -> Iterator[str]:
        decoder, stop_filter = self.tokenizer.stream_decoder(), StopTextFilter(seq.params.stop)
        scheduler = self.new_scheduler()
        scheduler.add(seq)
        for step in scheduler.run():
            for _, token in step:
                piece = self._emit(scheduler, seq, token, decoder, stop_filter)
                if piece:
                    yield piece
        tail = stop_filter.push(decoder.flush()) + stop_filter.flush()
        if tail:
            yield tail

    def _emit(self, scheduler, seq, token, decoder, stop_filter) -> str:
        if token in self.tokenizer.eos_ids or token in seq.params.stop_token_ids:
            return ""
        shown = stop_filter.push(decoder.push(token))
        if stop_filter.stopped:
            scheduler.finish(seq, "stop")
        return shown

    # ---- token ids ---------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 16, **sampling) -> list[int]:
        """The new token ids (EOS included when it ends the generation)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        seq = self.engine.new_sequence(list(prompt_ids), params)
        scheduler = self.new_scheduler()
        scheduler.add(seq)
        for _ in scheduler.run():
            pass
        return seq.output_ids

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Prefill logits of every position, float32 [n, vocab] on the CPU."""
        return self.engine.prefill_logits(list(token_ids)).cpu()


def per_request_params(count: int, sampling, shared: dict) -> list[SamplingParams]:
    """One SamplingParams per prompt: the shared fields, overridden by each sampling entry."""
    if sampling is None:
        return [SamplingParams(**shared)] * count
    sampling = list(sampling)
    if len(sampling) != count:
        raise ValueError(f"sampling has {len(sampling)} entries for {count} prompts; "
                         f"give one per prompt")
    params = []
    for entry in sampling:
        if isinstance(entry, SamplingParams):
            params.append(entry)
        elif isinstance(entry, dict):
            params.append(SamplingParams(**{**shared, **entry}))
        else:
            raise TypeError(f"each sampling entry must be a dict or SamplingParams, "
                            f"got {type(entry).__name__}")
    return params

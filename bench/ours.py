"""This engine's figures on a random-weight model: decode, prefill, peak memory."""
from __future__ import annotations

import gc
import time

import torch

from bench.random_model import random_state_dict
from bench.timing import sync, timed
from graph.llama import LlamaModel
from runtime.engine import make_engine
from runtime.kv_budget import default_kv_cache_tokens
from runtime.kv_cache import PagedKVCache
from runtime.sampler import SamplingParams
from runtime.scheduler import Scheduler

BLOCK_SIZE = 16
LONG_PROMPT = 4096


def build_engine(config, device, cuda_graphs=True, dtype=torch.bfloat16):
    layer_devices = [torch.device(device)] * config.num_hidden_layers
    model = LlamaModel(config, random_state_dict(config, device, dtype), layer_devices, dtype)
    tokens = default_kv_cache_tokens(config, dtype, layer_devices)
    cache = PagedKVCache(-(-tokens // BLOCK_SIZE), BLOCK_SIZE, config.num_key_value_heads,
                         config.head_dim, dtype, layer_devices)
    return make_engine(model, cache, eos_ids=[], cuda_graphs=cuda_graphs)


def decode_tokens_per_s(engine, prompt_len=16, new_tokens=128, batch=1, seed=0,
                        through_scheduler=False) -> float:
    """Decode steps per second after the prefill (the first token comes from prefill), through
    the engine's plain loop or through the scheduler that LlamaGenerator uses."""
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    seqs = [engine.new_sequence(p, SamplingParams(max_new_tokens=new_tokens)) for p in prompts]
    if through_scheduler:
        scheduler = Scheduler(engine)
        for seq in seqs:
            scheduler.add(seq)
        steps = scheduler.run()
    else:
        steps = engine.generate(seqs)
    next(steps)
    sync(engine.model.first_device)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    sync(engine.model.first_device)
    return count * batch / (time.perf_counter() - start)


def prefill_tokens_per_s(engine, prompt_len=512, repeat=5) -> float:
    vocab = engine.model.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,)).tolist()

    def once():
        seq = engine.new_sequence(prompt, SamplingParams(max_new_tokens=1))
        for _ in engine.generate([seq]):
            pass

    once()
    return prompt_len / timed(once, engine.model.first_device, repeat)


def graph_replay_ms(engine, replays=100) -> float | None:
    """GPU time of the latest captured decode step (a batch-1 step where the caller ran one),
    replayed back to back: the kernels alone, without the host work between steps."""
    graphs = engine.graphs
    if graphs is None or graphs.last_replayed is None:
        return None
    segments = graphs.last_replayed.graphs
    return 1e3 * timed(lambda: [g.replay() for _ in range(replays) for g in segments],
                       engine.model.first_device, repeat=3) / replays


@torch.inference_mode()
def measure(config, device, cuda_graphs=True, decode_only=False, long_decode=False) -> dict:
    """Build an engine of random weights and measure it; decode_only stops after the short
    decode figures (decode, decode_scheduler, replay_ms), as bench.ab_switch needs, adding
    decode_long where long_decode asks for it."""
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    engine = build_engine(config, device, cuda_graphs)
    sync(device)
    build_s = time.perf_counter() - start
    decode_tokens_per_s(engine, new_tokens=8)  # warm-up: autotune, compile, graph capture
    result = {"build_s": build_s,
              # which batch-1 step ran: the persistent one up to this many positions, else 0
              "persistent_up_to": engine.persistent.longest_context if engine.persistent else 0,
              "decode": decode_tokens_per_s(engine),
              "decode_scheduler": decode_tokens_per_s(engine, through_scheduler=True),
              # replays the last step uploaded: the one above, 143 tokens of context
              "replay_ms": graph_replay_ms(engine)}
    if long_decode or not decode_only:
        # a long context: the decode attention's share of the step grows with it
        result["decode_long"] = decode_tokens_per_s(engine, prompt_len=LONG_PROMPT, new_tokens=64)
    if not decode_only:
        result.update(
            prefill=prefill_tokens_per_s(engine),
            peak_gb=torch.cuda.max_memory_allocated(device) / 1e9,
            kv_tokens=engine.cache.capacity_tokens)
    del engine
    gc.collect()  # the engine and its CUDA graphs hold each other: free the cache memory now
    torch.cuda.empty_cache()
    return result

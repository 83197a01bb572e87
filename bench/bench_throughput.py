"""Throughput of many requests at once through the scheduler, on random weights of real model
shapes (bf16), beside transformers' batched generate on the same shape in the same run.

Settings: (a) 256 requests of a 128-token prompt + 128 generated tokens each (llama.cpp's
batched-bench setting); (b) 256 requests with prompt lengths uniform in 32..512 + 128 generated.
Prints generated and total tokens/s, and the KV-cache memory the paged cache used at its peak
against a contiguous cache that reserves prompt + max_new_tokens, or the whole context, per
request. Run on a CUDA machine:

    python -m bench.bench_throughput --shapes 1b 8b --settings a b
"""
from __future__ import annotations

import argparse
import gc
import random
import time

import torch

SETTINGS = {"a": "256 x (128 prompt + 128 new)", "b": "256 x (32..512 prompt + 128 new)"}


def make_requests(setting: str, vocab: int, count: int = 256, seed: int = 0) -> list[list[int]]:
    """Random prompts of the setting's lengths (random tokens: no prefix is shared)."""
    rng = random.Random(seed)
    if setting == "a":
        lengths = [128] * count
    elif setting == "b":
        lengths = [rng.randint(32, 512) for _ in range(count)]
    else:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(SETTINGS)}")
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def kv_memory(prompt_lens: list[int], new_tokens: int, peak_blocks: int, bytes_per_block: int,
              bytes_per_token: int, context: int) -> dict:
    """Bytes of KV cache: what the paged cache held at its peak, and what contiguous
    per-request caches would reserve for the same requests all running at once."""
    return {"paged": peak_blocks * bytes_per_block,
            "contiguous": sum(p + new_tokens for p in prompt_lens) * bytes_per_token,
            "max_context": len(prompt_lens) * context * bytes_per_token}


def run_ours(engine, prompts: list[list[int]], new_tokens: int, **scheduler_options) -> dict:
    """All prompts through one scheduler; times from the first step to the last token."""
    from bench.timing import sync
    from runtime.sampler import SamplingParams
    from runtime.scheduler import Scheduler

    engine.cache.allocator.clear_cache()   # no prefix left over from an earlier run
    scheduler = Scheduler(engine, **scheduler_options)
    for prompt in prompts:
        scheduler.add(engine.new_sequence(prompt, SamplingParams(max_new_tokens=new_tokens)))
    device = engine.model.first_device
    sync(device)
    start = time.perf_counter()
    generated = sum(len(step) for step in scheduler.run())
    sync(device)
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts)
    return {"seconds": seconds, "generated": generated,
            "gen_tps": generated / seconds, "total_tps": (prompt_tokens + generated) / seconds,
            "peak_blocks": scheduler.peak_blocks_in_use, "preemptions": scheduler.num_preemptions}


def measure_setting(engine, setting: str, count: int, new_tokens: int,
                    **scheduler_options) -> tuple[dict, list[list[int]]]:
    """The setting's row and prompts: an untimed run of the very same requests, then the timed
    one. Equal prompt lengths give the timed run the warm-up's schedule step for step, so it
    meets no batch shape for the first time: a new decode bucket costs seconds of Triton
    autotuning, compilation and CUDA-graph capture. (A warm-up on other lengths left bucket 32
    to the timed run of setting (b) and made it look 10x slower than (a).) run_ours forgets the
    warm-up's prefix blocks, so the timed run computes every prompt again."""
    prompts = make_requests(setting, engine.model.config.vocab_size, count)
    run_ours(engine, prompts, new_tokens, **scheduler_options)
    row = {"setting": setting, **run_ours(engine, prompts, new_tokens, **scheduler_options)}
    return row, prompts


def run_hf(model, prompts: list[list[int]], new_tokens: int, batch: int) -> dict:
    """transformers' generate, eager, on left-padded batches of `batch` prompts."""
    from bench.timing import sync
    device = model.device
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0)
    model.generate(torch.tensor([prompts[0][:16]] * 2, device=device), **dict(args, max_new_tokens=4,
                   min_new_tokens=4))   # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[i:i + batch])
        model.generate(ids.to(device), attention_mask=mask.to(device), **args)
    sync(device)
    seconds = time.perf_counter() - start
    generated = len(prompts) * new_tokens
    prompt_tokens = sum(len(p) for p in prompts)
    return {"seconds": seconds, "gen_tps": generated / seconds,
            "total_tps": (prompt_tokens + generated) / seconds}


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.inference_mode()
def measure_shape(config, device, settings, count, new_tokens, hf_batch, scheduler_options):
    from bench import hf_peer
    from bench.ours import build_engine
    from runtime.kv_cache import bytes_per_token

    engine = build_engine(config, device)
    per_token = bytes_per_token(config.num_hidden_layers, config.num_key_value_heads,
                                config.head_dim, torch.bfloat16)
    rows = []
    for setting in settings:
        row, prompts = measure_setting(engine, setting, count, new_tokens, **scheduler_options)
        row.update(kv_memory([len(p) for p in prompts], new_tokens, row["peak_blocks"],
                             engine.cache.bytes_per_block, per_token,
                             config.max_position_embeddings))
        rows.append((row, prompts))
        print(row_line(row), flush=True)
    del engine
    gc.collect()   # the engine and its CUDA graphs hold each other: free the cache now
    torch.cuda.empty_cache()
    if hf_batch:
        model = hf_peer._build(config, device)
        for row, prompts in rows:
            row.update({"hf_" + k: v for k, v in run_hf(model, prompts, new_tokens, hf_batch).items()})
            print(row_line(row), flush=True)
        del model
        torch.cuda.empty_cache()
    return [row for row, _ in rows]


def row_line(row: dict) -> str:
    gb = 1e9
    line = (f"setting {row['setting']}: {row['gen_tps']:,.0f} generated tok/s, "
            f"{row['total_tps']:,.0f} total tok/s, {row['seconds']:.2f} s, "
            f"{row['preemptions']} preemptions; KV used {row['paged'] / gb:.2f} GB "
            f"(contiguous prompt+new {row['contiguous'] / gb:.2f} GB, "
            f"max context {row['max_context'] / gb:.1f} GB)")
    if "hf_gen_tps" in row:
        line += (f"; transformers eager {row['hf_gen_tps']:,.0f} generated tok/s, "
                 f"{row['hf_total_tps']:,.0f} total tok/s")
    return line


def table(results: list[tuple[str, dict]]) -> str:
    def f(row, key, scale=1.0, fmt="{:,.0f}"):
        return fmt.format(row[key] / scale) if key in row else "-"
    lines = ["| shape | setting | generated tok/s | total tok/s | KV used GB | contiguous GB | "
             "max-context GB | transformers generated tok/s | transformers total tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, r in results:
        lines.append(f"| {shape} | {SETTINGS[r['setting']]} | {f(r, 'gen_tps')} | "
                     f"{f(r, 'total_tps')} | {f(r, 'paged', 1e9, '{:.2f}')} | "
                     f"{f(r, 'contiguous', 1e9, '{:.2f}')} | {f(r, 'max_context', 1e9, '{:.1f}')} | "
                     f"{f(r, 'hf_gen_tps')} | {f(r, 'hf_total_tps')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from bench.shapes import NAMES, SHAPES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--settings", nargs="+", default=["a", "b"], choices=sorted(SETTINGS))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=256,
                        help="prompts per transformers generate call; 0 skips transformers")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    options = dict(max_num_batched_tokens=args.max_num_batched_tokens,
                   max_num_seqs=args.max_num_seqs)
    results = []
    for shape in args.shapes:
        print(f"## {NAMES[shape]}", flush=True)
        for row in measure_shape(SHAPES[shape], device, args.settings, args.requests,
                                 args.new_tokens, args.hf_batch, options):
            results.append((NAMES[shape], row))
    print(table(results))


if __name__ == "__main__":
    main()

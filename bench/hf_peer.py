"""transformers on the same shapes in the same run: eager, and static cache + torch.compile."""
from __future__ import annotations

import time

import torch

from bench.shapes import hf_config_dict
from bench.timing import sync


def _build(config, device):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    hf_config = HFConfig(**hf_config_dict(config))
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def _generate_tokens_per_s(model, device, new_tokens, prompt_len=16, **kwargs) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0, **kwargs)
    for _ in range(2):  # warm-up at the timed length: a static cache is sized by it
        model.generate(ids, **args)
    sync(device)
    start = time.perf_counter()
    model.generate(ids, **args)
    sync(device)
    return new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def measure(config, device, new_tokens=128, compile_too=True) -> dict:
    model = _build(config, device)
    result = {"eager": _generate_tokens_per_s(model, device, new_tokens)}
    if compile_too:
        # transformers compiles the decode forward itself when the cache is static
        result["static_compile"] = _generate_tokens_per_s(
            model, device, new_tokens, cache_implementation="static")
    del model
    torch.cuda.empty_cache()
    return result

"""CPU decode speed of the default model (SmolLM2-135M-Instruct, fp32), beside transformers on
the same weights, on a fixed number of threads:

    python -m bench.bench_cpu --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from api.inference import LlamaGenerator
from utils.checkpoint import load_native

PROMPT = "The capital of France is"


def ours_tokens_per_s(gen: LlamaGenerator, new_tokens: int) -> tuple[float, float]:
    """(decode tok/s after the first token, prefill seconds of the prompt)."""
    ids = gen.tokenizer.encode(PROMPT)
    gen.generate_ids(ids, max_new_tokens=4)  # warm-up
    seq = gen.engine.new_sequence(ids, _no_eos_params(new_tokens))
    steps = gen.engine.generate([seq])
    start = time.perf_counter()
    next(steps)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start), prefill


def _no_eos_params(new_tokens):
    from runtime.sampler import SamplingParams
    return SamplingParams(max_new_tokens=new_tokens)


def native_to_hf(config, state_dict) -> dict:
    """The native fused weights split back into Hugging Face names, for transformers."""
    c, out = config, {"model.embed_tokens.weight": state_dict["tok_embeddings.weight"],
                      "model.norm.weight": state_dict["norm.weight"]}
    out["lm_head.weight"] = state_dict.get("output.weight", state_dict["tok_embeddings.weight"])
    for i in range(c.num_hidden_layers):
        n, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[n + "attention.wqkv.weight"].split([c.q_size, c.kv_size, c.kv_size])
        gate, up = state_dict[n + "feed_forward.w13.weight"].chunk(2)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": state_dict[n + "attention.wo.weight"],
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": state_dict[n + "feed_forward.w2.weight"],
                    h + "input_layernorm.weight": state_dict[n + "attention_norm.weight"],
                    h + "post_attention_layernorm.weight": state_dict[n + "ffn_norm.weight"]})
    return out


def transformers_tokens_per_s(model_dir: str, new_tokens: int, ids: list[int]) -> float:
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    config, state_dict = load_native(model_dir)
    hf_config = HFConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         intermediate_size=config.intermediate_size,
                         num_hidden_layers=config.num_hidden_layers,
                         num_attention_heads=config.num_attention_heads,
                         num_key_value_heads=config.num_key_value_heads,
                         head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
                         rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
                         max_position_embeddings=config.max_position_embeddings,
                         tie_word_embeddings=config.tie_word_embeddings)
    model = LlamaForCausalLM(hf_config).eval()
    model.load_state_dict({k: v.float() for k, v in native_to_hf(config, state_dict).items()},
                          strict=False)
    args = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        x = torch.tensor([ids])
        model.generate(x, max_new_tokens=4, **args)
        start = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **args)
        return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each engine, alternating; the median is printed too "
                             "(a shared machine's speed moves between runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = LlamaGenerator(args.model, device="cpu", dtype="float32")
    ids = gen.tokenizer.encode(PROMPT)
    ours_runs, hf_runs = [], []
    for _ in range(args.repeat):
        ours, prefill = ours_tokens_per_s(gen, args.tokens)
        ours_runs.append(ours)
        print(f"llama-triton: {ours:.1f} tok/s decode ({args.threads} threads, fp32), "
              f"prefill of {len(ids)} tokens {prefill * 1e3:.0f} ms")
        if not args.no_hf:
            hf_runs.append(transformers_tokens_per_s(gen.model_dir, args.tokens, ids))
            print(f"transformers: {hf_runs[-1]:.1f} tok/s (same weights, {args.threads} "
                  f"threads, fp32)")
    if args.repeat > 1:
        hf_median = f", transformers {statistics.median(hf_runs):.1f}" if hf_runs else ""
        print(f"median of {args.repeat}: llama-triton {statistics.median(ours_runs):.1f}"
              f"{hf_median} tok/s")


if __name__ == "__main__":
    main()

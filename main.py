"""Command line: python main.py [MODEL] -p PROMPT --max_tokens N ... streams the completion."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Generate text with a Llama-architecture model.")
    p.add_argument("model", nargs="?", default=None,
                   help="native model folder (model.json + state_dict.pt), Hugging Face folder "
                        "(with --fmt hf) or .gguf file; default: SmolLM2-135M-Instruct, "
                        "downloaded and converted on first use")
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--max_tokens", type=int, default=16, help="new tokens to generate (>= 1)")
    p.add_argument("--fmt", default="triton", help="model format: triton (native), hf or gguf")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N; default: CUDA when available, else the CPU")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to split the layers over, e.g. cuda:0,cuda:1")
    p.add_argument("--split", default=None,
                   help="layers per device with --devices: counts like 10,22, or 'memory' to "
                        "follow each device's free memory; default: even")
    p.add_argument("--dtype", default=None,
                   help="float32, float16 or bfloat16; default: the model's on CUDA, float32 on CPU")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--min_p", type=float, default=0.0,
                   help="drop tokens below min_p times the top probability (0: off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template as a user message")
    p.add_argument("--kv_cache_tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--debug", action="store_true", help="show the traceback on errors")
    return p


def _parse_split(text: str | None) -> list[int] | str | None:
    if text is None or text == "memory":
        return text
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"--split must be layer counts like 10,22 or 'memory', got {text!r}") from None


def run(args: argparse.Namespace) -> None:
    from api.inference import LlamaGenerator
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    devices = args.devices.split(",") if args.devices else None
    generator = LlamaGenerator(args.model, fmt=args.fmt, device=args.device, dtype=args.dtype,
                               devices=devices, kv_cache_tokens=args.kv_cache_tokens,
                               split=_parse_split(args.split))
    sampling = dict(max_new_tokens=args.max_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop=args.stop or [])
    if args.chat:
        pieces = generator.chat_stream([{"role": "user", "content": args.prompt}], **sampling)
    else:
        pieces = generator.stream(args.prompt, **sampling)
    sys.stdout.write("› ")
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user; --debug shows where
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

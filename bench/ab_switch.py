"""A/B of one LLAMA_TRITON_* switch in one process on one GPU: for each shape, an engine is
built (and its graphs captured) per setting, in alternation, and its batch-1 decode measured:
tokens/s through the engine's loop and through the scheduler, and the graph replay of one step.
usage: python -m bench.ab_switch LLAMA_TRITON_SUM_LATER --shapes 1b 8b --rounds 2 [--long]"""
from __future__ import annotations

import argparse
import os

import torch

from bench import ours
from bench.shapes import SHAPES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("switch", help="an environment switch such as LLAMA_TRITON_PDL")
    parser.add_argument("--values", nargs="+", default=["0", "1"])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--long", action="store_true",
                        help=f"also decode after a {ours.LONG_PROMPT}-token prompt")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name(device)}; {args.switch} in {args.values}")
    long_column = f" after a {ours.LONG_PROMPT}-token prompt tok/s |" if args.long else ""
    print("| shape | setting | decode tok/s | via scheduler tok/s | replay ms |" + long_column)
    print("| --- | --- | --- | --- | --- |" + (" --- |" if args.long else ""))
    before = os.environ.get(args.switch)
    try:
        for shape in args.shapes:
            for _ in range(args.rounds):
                for value in args.values:
                    os.environ[args.switch] = value
                    r = ours.measure(SHAPES[shape], device, decode_only=True,
                                     long_decode=args.long)
                    long_figure = f" {r['decode_long']:.1f} |" if args.long else ""
                    print(f"| {shape} | {args.switch}={value} | {r['decode']:.1f} | "
                          f"{r['decode_scheduler']:.1f} | {r['replay_ms']:.4f} |{long_figure}",
                          flush=True)
    finally:  # a caller in the same process gets the switch back as it was
        if before is None:
            os.environ.pop(args.switch, None)
        else:
            os.environ[args.switch] = before


if __name__ == "__main__":
    main()

"""Model load time: a native checkpoint of a given shape (random bf16 weights) written to disk,
then timed from disk to a model ready on the GPU (config + memory-mapped weights + copy).

    python -m bench.load_time --shape 8b --dir /tmp/llama-8b-native
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.random_model import random_state_dict
from bench.shapes import SHAPES
from graph.llama import LlamaModel
from utils.checkpoint import load_native, save_native


def write_checkpoint(shape: str, folder: str) -> float:
    """Write the checkpoint (once); returns its size in GB."""
    config = SHAPES[shape]
    if not os.path.isfile(os.path.join(folder, "model.json")):
        state = {k: v.cpu() for k, v in random_state_dict(config, "cuda").items()}
        save_native(folder, config, state)
    return os.path.getsize(os.path.join(folder, "state_dict.pt")) / 1e9


def load_seconds(folder: str, device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    config, state = load_native(folder)
    model = LlamaModel(config, state, [device] * config.num_hidden_layers, torch.bfloat16)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del model, state
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--dir", default="/tmp/llama-triton-load-bench")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    size = write_checkpoint(args.shape, args.dir)
    times = [load_seconds(args.dir, device) for _ in range(2)]
    print(f"load {args.shape} ({size:.1f} GB state_dict.pt) from disk to GPU: first "
          f"{times[0]:.1f} s, second {times[1]:.1f} s ({size / times[1]:.1f} GB/s); the file "
          f"was just written, so the first load may already read from the page cache")


if __name__ == "__main__":
    main()

"""Decode and prefill tokens/s of this engine beside transformers and the roofline, on random
weights of real model shapes (bf16). Run on a CUDA machine:

    python -m bench.bench_gpu --shapes 1b 8b
"""
from __future__ import annotations

import argparse
import datetime
import subprocess

import torch

from bench import hf_peer, ours
from bench.gemm_vs_cublas import gemm_table
from bench.random_model import weight_bytes
from bench.shapes import NAMES, SHAPES
from bench.timing import copy_bandwidth


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-compile", action="store_true", help="skip transformers + compile")
    parser.add_argument("--eager-too", action="store_true",
                        help="also time our decode without CUDA graphs (launch overhead)")
    parser.add_argument("--gemm", action="store_true", help="Triton GEMM against cuBLAS")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = copy_bandwidth(device)
    print(f"# {datetime.date.today()} {torch.cuda.get_device_name(device)}, commit {_commit()}, "
          f"torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shapes:
        config = SHAPES[shape]
        row = {"shape": NAMES[shape], "roofline": bandwidth / weight_bytes(config),
               **ours.measure(config, device)}
        print(row, flush=True)
        if args.eager_too:
            row["decode_eager"] = ours.measure(config, device, cuda_graphs=False)["decode"]
        if not args.no_hf:
            row.update({"hf_" + k: v for k, v in
                        hf_peer.measure(config, device, compile_too=not args.no_compile).items()})
        rows.append(row)
        print(row, flush=True)
        if args.gemm:
            print(gemm_table(config, device), flush=True)
    print(_table(rows))


def _table(rows) -> str:
    def f(row, key, fmt="{:.0f}"):
        return fmt.format(row[key]) if key in row else "-"
    lines = ["| shape | decode tok/s (b=1) | same through the scheduler | roofline | "
             "% of roofline | graph replay alone, tok/s | decode after a 4096-token prompt | "
             "decode, no graphs | "
             "prefill 512 tok/s | peak GB | transformers eager | transformers static+compile |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {f(r, 'decode')} | {f(r, 'decode_scheduler')} | "
                     f"{f(r, 'roofline')} | "
                     f"{100 * r['decode'] / r['roofline']:.0f}% | {_replay_rate(r)} | "
                     f"{f(r, 'decode_long')} | {f(r, 'decode_eager')} | "
                     f"{f(r, 'prefill')} | {f(r, 'peak_gb', '{:.1f}')} | {f(r, 'hf_eager')} | "
                     f"{f(r, 'hf_static_compile')} |")
    return "\n".join(lines)


def _replay_rate(row) -> str:
    return f"{1e3 / row['replay_ms']:.0f}" if row.get("replay_ms") else "-"


if __name__ == "__main__":
    main()

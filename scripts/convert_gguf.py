"""python scripts/convert_gguf.py FILE.gguf OUT_DIR [--dtype float32|float16|bfloat16]

Writes OUT_DIR/model.json + state_dict.pt + tokenizer.json + tokenizer_config.json.
Errors end in one line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graph.config import ConfigError  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.cli import OneLineParser  # noqa: E402
from utils.gguf_import import DTYPES, GGUFError, convert_gguf  # noqa: E402
from utils.tokenizer import TokenizerError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python scripts/convert_gguf.py",
                            description="Convert a llama.cpp GGUF file (Llama architecture) to "
                                        "the native format.")
    parser.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the model into")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights dtype (default: float32 for F32 files, bfloat16 for BF16, "
                             "float16 for F16 and quantized files)")
    args = parser.parse_args(argv)
    try:
        convert_gguf(args.gguf, args.out_dir, args.dtype, progress=True)
    except (GGUFError, TokenizerError, ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"native model written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turning what the user names (a native folder, a Hugging Face folder, a GGUF file, or nothing)
into a native model folder, converting once where needed."""
from __future__ import annotations

import os

from utils.checkpoint import CheckpointError, is_native_dir

FORMATS = ("triton", "hf", "gguf")


class UnknownFormatError(ValueError):
    """fmt names no format we read."""


def resolve_model_dir(path: str | None, fmt: str | None = "triton") -> str:
    if fmt is not None and fmt not in FORMATS:
        raise UnknownFormatError(f"unknown fmt {fmt!r}; use one of {', '.join(FORMATS)}")
    if path is None:
        from utils.default_model import default_gguf_path
        path, fmt = default_gguf_path(), "gguf"
    path = os.path.expanduser(str(path))
    if fmt == "gguf" or (os.path.isfile(path) and path.endswith(".gguf")):
        from utils.gguf_import import ensure_converted
        return ensure_converted(path)
    if not os.path.exists(path):
        raise CheckpointError(f"model path not found: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; pass a model folder or a .gguf file")
    if fmt == "hf":
        from utils.hf_import import convert
        return convert(path)
    if is_native_dir(path):
        return path
    if os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} holds a Hugging Face checkpoint, not the native format; "
                              f"use fmt='hf' (CLI: --fmt hf)")
    if not os.listdir(path):
        raise CheckpointError(f"model folder {path} is empty")
    raise CheckpointError(f"{path} holds no model.json + state_dict.pt")

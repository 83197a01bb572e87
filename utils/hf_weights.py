"""Finding and reading a Hugging Face checkpoint's weight files, one tensor or shard at a time.

Layouts, in the order Hugging Face prefers them: model.safetensors; sharded safetensors named by
model.safetensors.index.json; pytorch_model.bin; sharded .bin named by pytorch_model.bin.index.json.
A .bin is untrusted input: it is only ever read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from utils.checkpoint import CheckpointError, load_torch_file

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SHARD_NAME = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


class HFImportError(CheckpointError):
    """A Hugging Face checkpoint that cannot be converted; the message names the problem."""


def find_weight_files(hf_dir: str) -> list[str]:
    """File names (in hf_dir) holding the weights: the single file, or the index then its shards."""
    for single, index in ((SAFE, SAFE_INDEX), (BIN, BIN_INDEX)):
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [single]
        if os.path.isfile(os.path.join(hf_dir, index)):
            return [index, *_shards(hf_dir, index)]
    shards = sorted(n for n in os.listdir(hf_dir) if _SHARD_NAME.fullmatch(n))
    if shards:
        raise HFImportError(f"{hf_dir} holds shard '{shards[0]}' but no index "
                            f"({SAFE_INDEX} or {BIN_INDEX}) naming the shards")
    raise HFImportError(f"no weights file in {hf_dir}: expected {SAFE}, {SAFE_INDEX}, {BIN} "
                        f"or {BIN_INDEX}")


def read_index(hf_dir: str, index: str) -> dict[str, str]:
    """The index's weight_map (weight name -> shard file name), checked for shape."""
    path = os.path.join(hf_dir, index)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (ValueError, AttributeError) as e:
        raise HFImportError(f"{path} is not a valid index file ({e or 'not a JSON object'})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFImportError(f"{path} has no 'weight_map' naming the shards")
    for shard in weight_map.values():
        # the index is untrusted: a shard must be a plain file name inside hf_dir
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise HFImportError(f"{path} names an invalid shard file {shard!r}")
    return weight_map


def _shards(hf_dir: str, index: str) -> list[str]:
    shards = sorted(set(read_index(hf_dir, index).values()))
    for shard in shards:
        if not os.path.isfile(os.path.join(hf_dir, shard)):
            raise HFImportError(f"{index} names shard '{shard}', which is missing from {hf_dir}")
    return shards


class LazyWeights(Mapping):
    """weight name -> tensor over find_weight_files()'s files, read on access.

    safetensors are read one tensor at a time; a .bin shard is memory-mapped and only the
    latest one is kept, so reading in checkpoint order holds about one shard at a time.
    """

    def __init__(self, hf_dir: str, sources: list[str]):
        self._dir = hf_dir
        self._safe: dict[str, object] = {}
        self._bin_name, self._bin = None, {}
        if sources[0].endswith(".index.json"):
            self._where = read_index(hf_dir, sources[0])
        else:
            names = self._file(sources[0]).keys()
            self._where = dict.fromkeys(names, sources[0])

    def __enter__(self) -> "LazyWeights":
        return self

    def __exit__(self, *exc) -> None:
        self._safe.clear()
        self._bin_name, self._bin = None, {}

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self._where[name]
        if name not in self._file(shard).keys():
            raise HFImportError(f"shard '{shard}' does not hold weight '{name}', "
                                f"which the index places there")
        handle = self._file(shard)
        return handle.get_tensor(name) if shard.endswith(".safetensors") else handle[name]

    def _file(self, shard: str):
        """An open safetensors file, or the loaded .bin dict (the last .bin shard only)."""
        path = os.path.join(self._dir, shard)
        if shard.endswith(".safetensors"):
            if shard not in self._safe:
                self._safe[shard] = _open_safetensors(path)
            return self._safe[shard]
        if self._bin_name != shard:
            self._bin_name, self._bin = None, {}  # free the previous shard before loading
            try:
                self._bin = load_torch_file(path)
            except CheckpointError as e:
                raise HFImportError(str(e)) from e
            self._bin_name = shard
        return self._bin


def _open_safetensors(path: str):
    if os.path.getsize(path) == 0:
        raise HFImportError(f"{path} is empty")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise HFImportError(f"cannot read {path}: truncated or corrupt ({e})") from e

"""How many tokens the KV cache holds when the user does not say."""
from __future__ import annotations

import torch

from graph.config import LlamaConfig
from runtime.kv_cache import bytes_per_token

CUDA_MEMORY_FRACTION = 0.85   # of the free memory left after the weights
CPU_MEMORY_FRACTION = 0.25    # of available RAM: the CPU also holds the weights and the OS
MAX_CONTEXTS = 64             # enough for a large batch of full-context sequences


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 8 << 30
    return int(available * CPU_MEMORY_FRACTION)


def default_kv_cache_tokens(config: LlamaConfig, dtype: torch.dtype,
                            layer_devices: list[torch.device]) -> int:
    """On the CPU one full context; on CUDA as many contexts as the free memory allows (up to
    MAX_CONTEXTS), never less than one context and never more than each device can hold."""
    context = config.max_position_embeddings
    per_layer = bytes_per_token(1, config.num_key_value_heads, config.head_dim, dtype)
    fits = []
    for device in dict.fromkeys(layer_devices):
        layers_here = sum(1 for d in layer_devices if d == device)
        fits.append(_free_bytes(device) // (per_layer * layers_here))
    limit = min(fits)
    wanted = context if layer_devices[0].type == "cpu" else context * MAX_CONTEXTS
    return max(256, min(wanted, limit))

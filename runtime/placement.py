"""Which device holds which layer: consecutive layers per device, embedding on the first device,
final norm and head on the last."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that does not exist or cannot be used."""


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} does not exist: "
                              f"{torch.cuda.device_count()} CUDA device(s) found")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return device


def free_memory(device: torch.device) -> int:
    """Bytes free on a device now (for the CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def split_by_weights(num_layers: int, weights: list[float]) -> list[int]:
    """Layer counts proportional to weights, summing to num_layers (largest remainders first)."""
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[:num_layers - sum(counts)]:
        counts[i] += 1
    return counts


def split_layers(num_layers: int, devices: list[torch.device],
                 split: list[int] | str | None = None) -> list[torch.device]:
    """One device per layer. split gives each device's layer count, or "memory" to share the
    layers by each device's free memory; default: as even as can be, earlier devices first."""
    if not devices:
        raise DeviceError("devices must name at least one device")
    if split is None:
        split = split_by_weights(num_layers, [1.0] * len(devices))
    elif split == "memory":
        split = split_by_weights(num_layers, [free_memory(d) for d in _unique(devices)]
                                 if len(set(devices)) == len(devices)
                                 else [1.0] * len(devices))
    elif isinstance(split, str):
        raise DeviceError(f"split must be a list of layer counts or 'memory', got {split!r}")
    if len(split) != len(devices) or sum(split) != num_layers or min(split) < 0:
        raise DeviceError(f"split {split} must give a layer count per device "
                          f"({len(devices)} devices) summing to {num_layers} layers")
    return [device for device, count in zip(devices, split) for _ in range(count)]


def _unique(devices: list[torch.device]) -> list[torch.device]:
    return list(dict.fromkeys(devices))

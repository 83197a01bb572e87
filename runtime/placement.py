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


def split_layers(num_layers: int, devices: list[torch.device],
                 split: list[int] | None = None) -> list[torch.device]:
    """One device per layer. split gives each device's layer count; default: as even as can be,
    the earlier devices taking the remainder."""
    if not devices:
        raise DeviceError("devices must name at least one device")
    if split is None:
        base, extra = divmod(num_layers, len(devices))
        split = [base + (i < extra) for i in range(len(devices))]
    if len(split) != len(devices) or sum(split) != num_layers or min(split) < 0:
        raise DeviceError(f"split {split} must give a layer count per device "
                          f"({len(devices)} devices) summing to {num_layers} layers")
    return [device for device, count in zip(devices, split) for _ in range(count)]

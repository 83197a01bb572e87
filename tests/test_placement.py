import pytest
import torch

from runtime.placement import DeviceError, parse_device, split_layers

CPU = torch.device("cpu")


def test_even_split_gives_remainder_to_first_devices():
    a, b = torch.device("cpu"), torch.device("meta")
    assert split_layers(5, [a, b]) == [a, a, a, b, b]


def test_explicit_split():
    a, b = torch.device("cpu"), torch.device("meta")
    assert split_layers(4, [a, b], [1, 3]) == [a, b, b, b]


def test_bad_split_is_refused():
    with pytest.raises(DeviceError, match="summing to 4 layers"):
        split_layers(4, [CPU, CPU], [1, 2])
    with pytest.raises(DeviceError, match="at least one device"):
        split_layers(4, [])


def test_parse_device():
    assert parse_device("cpu") == CPU
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    with pytest.raises(DeviceError, match="not supported"):
        parse_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        parse_device("cuda:1")


def test_split_by_weights_sums_and_follows_weights():
    assert split_layers(5, [CPU, torch.device("meta")], [3, 2])[:3] == [CPU] * 3
    from runtime.placement import split_by_weights
    assert split_by_weights(32, [3.0, 1.0]) == [24, 8]
    assert split_by_weights(5, [1.0, 1.0]) == [3, 2]
    assert sum(split_by_weights(31, [0.3, 0.3, 0.4])) == 31


def test_split_by_free_memory(monkeypatch):
    import runtime.placement as placement
    a, b = torch.device("cpu"), torch.device("meta")
    monkeypatch.setattr(placement, "free_memory", lambda d: 30 if d == a else 10)
    assert split_layers(8, [a, b], "memory") == [a] * 6 + [b] * 2


def test_unknown_split_word_is_refused():
    with pytest.raises(DeviceError, match="split must be a list of layer counts or 'memory'"):
        split_layers(4, [CPU, CPU], "fast")


def test_free_memory_of_the_cpu_is_positive():
    from runtime.placement import free_memory
    assert free_memory(CPU) > 0

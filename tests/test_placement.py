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

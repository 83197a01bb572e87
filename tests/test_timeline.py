"""bench.timeline: the per-kernel summary of a profiled decode step."""
import pytest

from bench.timeline import Kernel, middle_step, summarize


def test_middle_step_takes_the_middle_replay():
    kernels = [Kernel(f"k{i}", i, 1.0) for i in range(9)]
    assert [k.name for k in middle_step(kernels, 3)] == ["k3", "k4", "k5"]


def test_uneven_replays_are_an_error():
    with pytest.raises(ValueError, match="7 kernels do not split into 3 equal replays"):
        middle_step([Kernel("k", 0, 1)] * 7, 3)


def test_summary_counts_launches_means_and_overlap():
    step = [Kernel("norm", 0.0, 2.0), Kernel("gemv", 1.5, 10.0),   # starts 0.5 early
            Kernel("norm", 12.0, 3.0), Kernel("gemv", 15.0, 20.0)]  # starts right after
    table = summarize(step)
    first = "one step: 4 kernels, 35.0 us from the first start to the last end"
    assert table.splitlines()[0] == first
    rows = table.splitlines()[3:]
    assert rows[0] == "| gemv | 2 | 15.00 | 30.0 | 0.25 |"    # the larger total first
    assert rows[1] == "| norm | 2 | 2.50 | 5.0 | -0.25 |"    # the first has none before it

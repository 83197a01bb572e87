"""The split choices bench/decode_split_sweep.py times (its timing needs a GPU)."""
from bench.decode_split_sweep import SPLITS, small_n_projections, split_choices
from bench.shapes import SHAPES
from kernels.linear import SPLIT_UNIT, decode_split_k


def test_split_choices_are_distinct_whole_units_that_cover_k():
    for K in (4096, 14336, 72, 8 * SPLIT_UNIT + 1):
        choices = split_choices(K)
        assert choices[0] == (1, K)
        assert len({s for s, _ in choices}) == len(choices) <= len(SPLITS)
        for split, per in choices[1:]:
            assert per % SPLIT_UNIT == 0 and (split - 1) * per < K <= split * per


def test_the_heuristic_pick_is_among_the_choices():
    # the 8B shape on an H200's 132 SMs: each projection's pick is one of the timed rows
    for n, k in small_n_projections(SHAPES["8b"]).values():
        assert decode_split_k(n, k, 132) in split_choices(k)

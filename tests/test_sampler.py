import pytest
import torch

from runtime.sampler import SamplingParams, apply_repetition_penalty, filter_logits, sample


def _logits(seed=0, vocab=50):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_picks_argmax_per_row():
    logits = torch.randn(3, 20)
    out = sample(logits, [SamplingParams()] * 3, [[]] * 3, [None] * 3)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_seed_makes_sampling_reproducible_and_seeds_differ():
    logits = _logits().unsqueeze(0)

    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed)
        g = p.make_generator(torch.device("cpu"))
        return [sample(logits, [p], [[]], [g]).item() for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_keeps_only_k_tokens():
    logits = _logits()
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=5)))
    assert kept.sum() == 5
    assert set(kept.nonzero().flatten().tolist()) == set(torch.topk(logits, 5).indices.tolist())


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.7)))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.1)))
    assert kept.tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, min_p=0.2)))
    assert kept.tolist() == [True, True, False, False]


def test_temperature_sharpens():
    logits = _logits()
    cold = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.1)), -1)
    warm = torch.softmax(filter_logits(logits, SamplingParams(temperature=2.0)), -1)
    assert cold.max() > warm.max()


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    greedy = sample(torch.tensor([[2.0, -2.0, 1.5]]), [SamplingParams(repetition_penalty=2.0)],
                    [[0]], [None])
    assert greedy.item() == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0), "top_p must be in (0, 1]"),
    (dict(min_p=1.0), "min_p must be in [0, 1)"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
])
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ["END"]

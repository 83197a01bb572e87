"""Choosing the next token from logits: greedy by default; temperature, top-k, top-p, min-p and
repetition penalty when asked. A seed gives each request its own generator, so sampling repeats."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.argmax import argmax


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    min_p: float = 0.0             # 0.0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)   # besides the model's EOS

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """Hugging Face's rule: a seen token's positive logit is divided by the penalty, a negative
    one multiplied, so the penalty always makes it less likely."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (removed tokens get -inf)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the first always stays
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def all_plain_greedy(params: list[SamplingParams]) -> bool:
    return all(p.greedy and p.repetition_penalty == 1.0 for p in params)


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of logits [B, vocab] (float32); returns int64 [B] on the logits' device."""
    if all_plain_greedy(params):
        return argmax(logits)
    chosen = []
    for row, p, history, generator in zip(logits, params, histories, generators):
        row = apply_repetition_penalty(row, history, p.repetition_penalty)
        if p.greedy:
            chosen.append(torch.argmax(row))
            continue
        probs = torch.softmax(filter_logits(row, p), dim=-1)
        chosen.append(torch.multinomial(probs, 1, generator=generator)[0])
    return torch.stack(chosen).to(torch.int64)

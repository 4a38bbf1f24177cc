"""Per-row token choice: greedy, seeded sampling, top-k/top-p, OpenAI penalties and logit_bias, one batch."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from llmadapter.config import GenerationParams
from llmadapter.engine.sampling import RowSampler, _filter, choose_tokens

VOCAB = 8


def params(**kwargs: Any) -> GenerationParams:
    return GenerationParams(max_tokens=10, **kwargs)


def row(choice_index: int = 0, **kwargs: Any) -> RowSampler:
    return RowSampler.create(params(**kwargs), choice_index)


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def draws(sampler_kwargs: dict[str, Any], scores: list[float], count: int, seed: int = 0) -> Counter[int]:
    sampler = row(seed=seed, **sampler_kwargs)
    return Counter(choose_tokens(logits(scores), [sampler])[0] for _ in range(count))


FLAT = [0.0] * VOCAB
RAMP = [float(i) for i in range(VOCAB)]  # token 7 most likely, 0 least
# Probabilities 0.5, 0.3, 0.2 for tokens 0, 1, 2, then ~0.
THREE = [float(torch.log(torch.tensor(p))) for p in (0.5, 0.3, 0.2)] + [-1e9] * (VOCAB - 3)


def test_greedy_picks_argmax_without_a_generator() -> None:
    sampler = row(temperature=0.0)
    assert sampler.generator is None
    assert choose_tokens(logits([0.1, 3.0, 0.2, -1.0]), [sampler]) == [1]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = row(seed=42), row(seed=42)
    seq_a = [choose_tokens(logits(FLAT), [a])[0] for _ in range(30)]
    seq_b = [choose_tokens(logits(FLAT), [b])[0] for _ in range(30)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1  # really sampled, not greedy
    assert torch.equal(torch.get_rng_state(), state)


def test_different_seeds_and_choice_indexes_differ() -> None:
    def sequence(seed: int, choice: int) -> list[int]:
        sampler = row(choice_index=choice, seed=seed)
        return [choose_tokens(logits(FLAT), [sampler])[0] for _ in range(30)]

    assert sequence(1, 0) != sequence(2, 0)
    # n choices of one seeded request must not be copies of each other.
    assert sequence(1, 0) != sequence(1, 1)


def test_unseeded_rows_get_their_own_random_generators() -> None:
    a, b = row(), row()
    assert a.generator is not None and b.generator is not None
    seq_a = [choose_tokens(logits(FLAT), [a])[0] for _ in range(30)]
    seq_b = [choose_tokens(logits(FLAT), [b])[0] for _ in range(30)]
    assert seq_a != seq_b


def test_top_k_keeps_only_the_k_best() -> None:
    assert set(draws({"top_k": 2}, RAMP, 200)) == {6, 7}
    assert set(draws({"top_k": 1}, RAMP, 50)) == {7}


@pytest.mark.parametrize(
    ("option", "value", "kept"),
    [
        ("top_p", 0.7, {0, 1}),
        ("top_p", 0.5, {0}),
        ("top_p", 1.0, {0, 1, 2}),
        ("min_p", 0.5, {0, 1}),
        ("min_p", 1.0, {0}),
        ("min_p", 0.0, {0, 1, 2}),
    ],
    ids=lambda v: str(v),
)
def test_top_p_and_min_p_keep_the_expected_tokens(option: str, value: float, kept: set[int]) -> None:
    """top_p: the smallest nucleus holding that mass; min_p (vLLM): tokens at least min_p times as likely
    as the most likely one (0.5 keeps p >= 0.25 here)."""
    assert set(draws({option: value}, THREE, 300)) == kept


def test_filter_top_p_keeps_the_first_token_always() -> None:
    out = _filter(torch.tensor([5.0, 0.0, 0.0]), top_k=0, top_p=1e-9)
    assert torch.isfinite(out).tolist() == [True, False, False]


def test_top_p_zero_keeps_only_the_most_likely_token() -> None:
    # The spec's range for top_p is [0, 1]; 0 leaves the nucleus its first token.
    assert set(draws({"top_p": 0.0}, RAMP, 100)) == {7}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    """vLLM (and transformers): on tokens of the prompt and the output, logit / p if > 0, else logit * p."""
    sampler = RowSampler.create(params(temperature=0.0, repetition_penalty=2.0), 0, prompt_ids=[0])
    sampler.observe(1)
    scores = logits([2.0, -2.0, 1.5])
    choose_tokens(scores, [sampler])
    assert scores[0].tolist() == pytest.approx([1.0, -4.0, 1.5])  # token 2 was never seen
    assert choose_tokens(logits([2.0, -2.0, 1.5]), [sampler]) == [2]


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached() -> None:
    sampler = RowSampler.create(params(temperature=0.0, min_tokens=2, stop_token_ids=(6,)), 0, eos_ids=[7])
    assert choose_tokens(logits(RAMP), [sampler]) == [5]  # 7 (EOS) and 6 (a stop token) banned
    sampler.observe(5)
    assert choose_tokens(logits(RAMP), [sampler]) == [5]
    sampler.observe(5)
    assert choose_tokens(logits(RAMP), [sampler]) == [7]  # two generated: EOS may end it


def test_temperature_sharpens_and_flattens() -> None:
    cold = draws({"temperature": 0.2}, RAMP, 300)
    hot = draws({"temperature": 2.0}, RAMP, 300)
    assert cold[7] > hot[7]
    assert len(hot) > len(cold)


@pytest.mark.parametrize(
    ("presence", "frequency", "expected"),
    [(0.5, 0.0, [1.5, 1.5, 1.0]), (0.0, 0.25, [1.5, 1.75, 1.0]), (0.5, 0.25, [1.0, 1.25, 1.0])],
    ids=["presence", "frequency", "both"],
)
def test_penalties_follow_openai_semantics(presence: float, frequency: float, expected: list[float]) -> None:
    """logit -= count * frequency_penalty + (count > 0) * presence_penalty, on generated tokens only."""
    sampler = row(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
    for token in (0, 0, 1):  # token 0 generated twice, token 1 once, token 2 never
        sampler.observe(token)
    scores = logits([2.0, 2.0, 1.0])
    choose_tokens(scores, [sampler])
    assert scores[0].tolist() == pytest.approx(expected)


def test_penalty_changes_the_greedy_choice() -> None:
    sampler = row(temperature=0.0, presence_penalty=2.0)
    sampler.observe(0)
    assert choose_tokens(logits([2.0, 1.0]), [sampler]) == [1]
    assert choose_tokens(logits([2.0, 1.0]), [row(temperature=0.0)]) == [0]


def test_negative_penalty_encourages_repetition() -> None:
    sampler = row(temperature=0.0, frequency_penalty=-2.0)
    sampler.observe(1)
    assert choose_tokens(logits([2.0, 1.0]), [sampler]) == [1]


def test_logit_bias_forces_and_bans_tokens() -> None:
    assert choose_tokens(logits(RAMP), [row(temperature=0.0, logit_bias={2: 100.0})]) == [2]
    assert choose_tokens(logits(RAMP), [row(temperature=0.0, logit_bias={7: -100.0})]) == [6]
    assert set(draws({"logit_bias": {3: 100.0}}, FLAT, 50)) == {3}


def test_each_row_of_a_batch_keeps_its_own_params() -> None:
    rows = [
        row(temperature=0.0),
        row(temperature=0.0, logit_bias={0: 100.0}),
        row(seed=3, top_k=1),
        row(temperature=0.0, presence_penalty=2.0),
    ]
    rows[3].observe(7)
    batch = logits(RAMP, RAMP, RAMP, RAMP)
    assert choose_tokens(batch, rows) == [7, 0, 7, 6]
    # Rows do not leak into each other: row 0's logits are untouched by row 1's bias and row 3's penalty.
    assert batch[0].tolist() == RAMP


def test_non_finite_logits_take_the_largest_instead_of_failing() -> None:
    # Sampled (temperature above the greedy cut-off), but the model produced inf: multinomial would raise.
    sampler = row(temperature=0.7, seed=0)
    assert sampler.generator is not None
    assert choose_tokens(logits([0.0, float("inf"), 1.0, -3.0]), [sampler]) == [1]


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 9e-6], ids=["zero", "underflow", "below-cutoff"])
def test_temperatures_below_the_cutoff_are_greedy(temperature: float) -> None:
    assert params(temperature=temperature).greedy
    assert not params(temperature=1e-4).greedy

"""The statistics of `rlhf eval`'s baselines (rlhf.eval_stats): best-of-n, win rates, bootstrap intervals."""

from __future__ import annotations

import math
import random

import pytest

from rlhf.eval_stats import (best_of_n_kl_bound, best_of_n_kl_estimate, best_of_n_pick, bootstrap_ci,
                             win_rate_per_prompt)


def test_best_of_n_kl_bound_formula():
    # log n - (n - 1) / n: n = 1 is the base policy itself; n = 2: ln 2 - 1/2 = 0.19315;
    # n = 4: ln 4 - 3/4 = 1.38629 - 0.75 = 0.63629; n = 16: 2.77259 - 0.9375 = 1.83509
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(0.193147, abs=1e-6)
    assert best_of_n_kl_bound(4) == pytest.approx(0.636294, abs=1e-6)
    assert best_of_n_kl_bound(16) == pytest.approx(1.835089, abs=1e-6)
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl_bound(0)


def test_best_of_n_kl_estimate_by_hand_and_below_the_bound():
    # Two distinct answers, equally likely, "b" scored higher. Best-of-2 picks "b" unless both draws
    # are "a": P_bon(a) = 1/4, P_bon(b) = 3/4.
    # KL = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = -0.25 ln 2 + 0.75 ln 1.5 = -0.17329 + 0.30410 = 0.13081
    assert best_of_n_kl_estimate(["a", "b"], [0.0, 1.0], 2) == pytest.approx(0.130812, abs=1e-6)
    # the same answer drawn 4 times: best-of-n cannot move away from it
    assert best_of_n_kl_estimate(["x"] * 4, [0.3] * 4, 4) == 0.0
    # identical answers merge: "a" twice (p 2/3) below "b" (p 1/3). Best-of-2 P_bon(a) = (2/3)^2 = 4/9
    # KL = 4/9 ln((4/9) / (2/3)) + 5/9 ln((5/9) / (1/3)) = 4/9 ln(2/3) + 5/9 ln(5/3) = -0.18020 + 0.28379
    assert best_of_n_kl_estimate(["a", "b", "a"], [0.0, 1.0, 0.0], 2) == pytest.approx(0.103587, abs=1e-5)
    rng = random.Random(0)
    for n in (1, 2, 4, 8, 16):
        answers = [rng.choice("abcdefghij") for _ in range(16)]
        scores = {a: rng.random() for a in "abcdefghij"}
        assert best_of_n_kl_estimate(answers, [scores[a] for a in answers], n) <= best_of_n_kl_bound(n) + 1e-12


def test_best_of_n_picks_the_rm_argmax_among_the_first_n():
    scores = [0.1, 0.7, 0.3, 0.9, 0.7]
    assert best_of_n_pick(scores, 1) == 0
    assert best_of_n_pick(scores, 2) == 1
    assert best_of_n_pick(scores, 3) == 1  # prefix [0.1, 0.7, 0.3]
    assert best_of_n_pick(scores, 4) == 3
    assert best_of_n_pick([0.5, 0.5], 2) == 0  # a tie keeps the first drawn
    with pytest.raises(ValueError, match="n=6"):
        best_of_n_pick(scores, 6)


def test_win_rate_counts_all_pairs_and_ties_as_half():
    # prompt 1: policy answers [1, 0] vs SFT [0.5]: wins 1 and 0 -> 1/2
    # prompt 2: policy [1] vs SFT [1, 0]: a tie (1/2) and a win (1) -> 3/4
    assert win_rate_per_prompt([[1.0, 0.0], [1.0]], [[0.5], [1.0, 0.0]]) == [0.5, 0.75]


def test_bootstrap_ci_hand_checked_case():
    # Three prompts with values 0, 0, 1. A resample of 3 prompts holds k ones, k ~ Binomial(3, 1/3):
    #   mean 0 w.p. (2/3)^3 = 8/27 = 0.296, mean 1/3 w.p. 12/27 = 0.444,
    #   mean 2/3 w.p. 6/27 = 0.222,         mean 1 w.p. 1/27 = 0.037.
    # The 2.5% quantile lies in the first mass (0.296 > 0.025): low = 0. P(mean <= 2/3) = 26/27 = 0.963
    # is below 0.975, so the 97.5% quantile is the top value: high = 1. (With 2000 resamples about
    # 74 land on 1, while the top 2.5% is 50 of them.)
    mean, low, high = bootstrap_ci([0.0, 0.0, 1.0], resamples=2000, seed=0)
    assert mean == pytest.approx(1 / 3) and low == 0.0 and high == 1.0
    # Twenty prompts at 0.5 and twenty at 1: the mean is 0.75; the interval is about
    # 0.75 +- 1.96 * sd/sqrt(40), sd = 0.25 -> +- 0.0775, so roughly [0.67, 0.83]
    mean, low, high = bootstrap_ci([0.5] * 20 + [1.0] * 20, resamples=2000, seed=0)
    assert mean == pytest.approx(0.75)
    assert 0.65 < low < 0.70 and 0.80 < high < 0.85
    # seeded: the same interval every time; equal values: no width
    assert bootstrap_ci([0.2, 0.9, 0.4], seed=3) == bootstrap_ci([0.2, 0.9, 0.4], seed=3)
    assert bootstrap_ci([0.4] * 5) == (0.4, 0.4, 0.4)

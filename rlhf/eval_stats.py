"""The statistics behind `rlhf eval`'s baselines: best-of-n, win rates and bootstrap intervals.

Best-of-n (Stiennon et al. 2020; Nakano et al. 2021): draw n answers from the SFT policy and keep the
one the reward model scores highest. Its KL to the SFT policy is at most

    KL(best-of-n || SFT) <= log n - (n - 1) / n

with equality when no two answers tie (Beirami et al. 2024, "Theoretical guarantees on the best-of-n
alignment policy"). Answers of a tiny world repeat often, so the measured estimate beside the bound
is the exact best-of-n KL under the empirical SFT distribution of the drawn samples (identical
answers merged): with the distinct answers sorted by RM score and F the empirical CDF,

    P_bon(y) = F(y)^n - F(y-)^n,     KL = sum_y P_bon(y) * log(P_bon(y) / p(y)).

Win rates compare every answer of a policy with every SFT answer to the same prompt (ties count one
half); intervals are percentile bootstraps over prompts, so a prompt's answers move together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1) / n: the KL of best-of-n to its base policy when answers never tie (nats)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_pick(rm_scores: Sequence[float], n: int) -> int:
    """Index of the answer best-of-n keeps: the RM's argmax over the first n (first one on a tie)."""
    if not 1 <= n <= len(rm_scores):
        raise ValueError(f"n={n} needs 1 <= n <= {len(rm_scores)} samples")
    head = list(rm_scores[:n])
    return head.index(max(head))


def best_of_n_kl_estimate(answers: Sequence[str], rm_scores: Sequence[float], n: int) -> float:
    """Exact best-of-n KL under the empirical distribution of `answers` (identical texts merged).

    At most `best_of_n_kl_bound(n)` (Beirami et al. 2024, for any discrete distribution); it nears the
    bound when the samples are many and all distinct, and is 0 when they are all the same answer.
    """
    weight: dict[str, float] = {}
    score: dict[str, float] = {}
    for answer, rm in zip(answers, rm_scores):
        weight[answer] = weight.get(answer, 0.0) + 1.0 / len(answers)
        score[answer] = rm  # an identical text has an identical score
    kl, below = 0.0, 0.0
    for answer in sorted(weight, key=lambda a: score[a]):
        p = weight[answer]
        p_bon = (below + p) ** n - below ** n
        if p_bon > 0:
            kl += p_bon * math.log(p_bon / p)
        below += p
    return max(kl, 0.0)


def win(a: float, b: float) -> float:
    """1 if a beats b, 1/2 on a tie, 0 otherwise."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def win_rate_per_prompt(scores: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> list[float]:
    """For each prompt, the mean of `win(s, b)` over all its (answer, baseline answer) pairs."""
    return [sum(win(s, b) for s in row for b in base) / (len(row) * len(base))
            for row, base in zip(scores, baseline, strict=True)]


def bootstrap_ci(per_prompt: Sequence[float], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a percentile bootstrap interval for the mean of per-prompt values.

    Each resample draws len(per_prompt) prompts with replacement (seeded: the same interval on every
    run); low and high are the sorted resample means at ranks floor(a * B) and ceil((1 - a) * B) - 1,
    a = (1 - level) / 2, B = resamples.
    """
    values = np.asarray(per_prompt, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one prompt")
    rng = np.random.default_rng(seed)
    means = np.sort(values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1))
    tail = (1.0 - level) / 2
    low = means[int(math.floor(tail * resamples))]
    high = means[int(math.ceil((1.0 - tail) * resamples)) - 1]
    return float(values.mean()), float(low), float(high)

"""Resumable shuffling: the item at any position of an endless stream of reshuffled epochs.

A stage asks for positions `start .. start + count`; the answer depends only on (n, seed, position),
so a resumed run sees exactly the batches an uninterrupted run would have seen, and the checkpoint
needs to hold only the position.
"""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of range(n) used in `epoch`. -> [n] int64"""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def shuffled_positions(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items `start .. start + count - 1` of the stream epoch_order(0) ++ epoch_order(1) ++ ..."""
    picked, orders = [], {}
    for position in range(start, start + count):
        epoch = position // n
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        picked.append(int(orders[epoch][position % n]))
    return picked

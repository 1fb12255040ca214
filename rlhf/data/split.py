"""Train/validation split by user id.

InstructGPT splits its prompt sets by user id: one user's prompts resemble each other, so a user with
prompts on both sides would make validation look better than it is. Here a user is a group of records
that always lands on one side; a record without a user id is a group of its own.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def split_by_user(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split `records` into (train, val) so that no user id appears in both.

    About `val_fraction` of the records (not of the users) go to val: whole groups are taken in a
    seeded random order until val holds at least that many. Val gets at least one group when
    `val_fraction > 0` and there are two groups or more, and train always keeps one. Each side keeps
    the input order. The result depends only on the records and `seed`: the groups are sorted before
    the seeded shuffle, and nothing depends on Python's per-process string hashing.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    record_indices_of: dict[tuple[str, str], list[int]] = {}
    for index, record in enumerate(records):
        user_id = record.get("user_id")
        # A record without a user is its own group; the two tags keep ids and indices from colliding.
        group = ("user", str(user_id)) if user_id is not None else ("record", f"{index:012d}")
        record_indices_of.setdefault(group, []).append(index)

    groups = sorted(record_indices_of)
    random.Random(seed).shuffle(groups)

    target_val_records = val_fraction * len(records)
    val_indices: set[int] = set()
    if val_fraction > 0 and len(groups) >= 2:
        for group in groups[:-1]:  # the last group stays in train, so train is never empty
            val_indices.update(record_indices_of[group])
            if len(val_indices) >= target_val_records:
                break

    train = [record for index, record in enumerate(records) if index not in val_indices]
    val = [record for index, record in enumerate(records) if index in val_indices]
    num_users = sum(1 for kind, _ in groups if kind == "user")
    logger.info(
        "split %d records (%d users, %d records without user id) into %d train / %d val (seed %d)",
        len(records), num_users, len(groups) - num_users, len(train), len(val), seed,
    )
    return train, val

"""The records of a data file that fall in given parts ("train", "tune", "test") of the one user split."""

from __future__ import annotations

import os

from rlhf.data.records import load_records
from rlhf.data.split import split_for


def load_parts(path: str | os.PathLike, kind: str, parts: tuple[str, ...], split: str | os.PathLike = "",
               skip_invalid: bool = False) -> list[list[dict]]:
    """`load_records(path, kind)` shared out by `split_for(path, split)`: one record list per part, so
    every stage reads the same split (train users for training, tune for choices, test for the report)."""
    records = load_records(path, kind, skip_invalid=skip_invalid)
    user_split = split_for(path, split)
    return [user_split.select(records, part) for part in parts]

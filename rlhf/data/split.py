"""Splitting records by user id: one train / tune / test split shared by every stage.

InstructGPT splits its prompt sets by user id: one user's prompts resemble each other, so a user with
prompts on both sides would make validation look better than it is. Here a user is a group of records
that always lands on one side; a record without a user id is a group of its own.

`UserSplit` is the split every stage and `rlhf eval` read: a user's part ("train", "tune" or "test")
depends only on the user id and the split's seed (or on an explicit list, as written to a
`split.json`), never on a stage's own seed or fraction. So the SFT, RM and PPO training sets hold only
`train` users whatever their seeds, choices such as a learning rate are made on `tune`, and the
reported figures come from `test`. Stages find `split.json` beside their data file (the toy world and
`rlhf pipeline` write one per data directory); without one, users are placed by a hash of
(seed, user id), which every stage computes the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


PARTS = ("train", "tune", "test")
SPLIT_FILE = "split.json"
_CONTENT_FIELDS = ("prompt", "completion", "messages", "responses", "chosen", "rejected", "text")


def _unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): sha256, so no per-process string hashing."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _record_key(record: Mapping) -> str:
    """A user's records share one key; a record without a user id is keyed by its content."""
    user_id = record.get("user_id")
    if user_id is not None:
        return f"user:{user_id}"
    content = {name: record[name] for name in _CONTENT_FIELDS if name in record}
    return "record:" + json.dumps(content, sort_keys=True)


@dataclass(frozen=True)
class UserSplit:
    """Users -> "train" / "tune" / "test", the same for every stage (see the module docstring)."""

    seed: int = 0  # ours: the one seed of the split
    tune_fraction: float = 0.1  # ours: users for choices (learning rate, ptx_coef) and validation curves
    test_fraction: float = 0.1  # ours: users only the reported evaluation sees
    users: Mapping[str, str] = field(default_factory=dict)  # explicit user id -> part; others are hashed

    def __post_init__(self):
        if not (0.0 <= self.tune_fraction < 1.0 and 0.0 <= self.test_fraction < 1.0
                and self.tune_fraction + self.test_fraction < 1.0):
            raise ValueError(f"tune_fraction={self.tune_fraction} and test_fraction={self.test_fraction} must be "
                             "in [0, 1) and leave room for train")
        bad = sorted({part for part in self.users.values() if part not in PARTS})
        if bad:
            raise ValueError(f"split parts must be {PARTS}, got {bad}")

    def part_of(self, record: Mapping) -> str:
        user_id = record.get("user_id")
        if user_id is not None and str(user_id) in self.users:
            return self.users[str(user_id)]
        u = _unit(_record_key(record), self.seed)
        return "test" if u < self.test_fraction else "tune" if u < self.test_fraction + self.tune_fraction else "train"

    def select(self, records: Sequence[dict], part: str) -> list[dict]:
        """The records of one part, in input order."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        chosen = [record for record in records if self.part_of(record) == part]
        logger.info("split: %d of %d records are %s (split seed %d)", len(chosen), len(records), part, self.seed)
        return chosen

    @classmethod
    def for_users(cls, user_ids: Iterable, seed: int = 0, tune_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> "UserSplit":
        """An explicit split of these users with exact counts: users ordered by their (seed, id) hash,
        the first round(test_fraction * n) to test, the next round(tune_fraction * n) to tune (each at
        least one when its fraction is > 0 and there are 3 users or more), the rest to train."""
        users = sorted({str(u) for u in user_ids if u is not None}, key=lambda u: (_unit(f"user:{u}", seed), u))
        n = len(users)

        def count(fraction: float) -> int:
            return max(round(fraction * n), 1 if fraction > 0 and n >= 3 else 0)

        n_test, n_tune = count(test_fraction), count(tune_fraction)
        parts = {u: "test" for u in users[:n_test]}
        parts.update({u: "tune" for u in users[n_test:n_test + n_tune]})
        parts.update({u: "train" for u in users[n_test + n_tune:]})
        return cls(seed, tune_fraction, test_fraction, parts)

    def write(self, path: str | os.PathLike) -> Path:
        """`split.json`: the seed, the fractions and the user ids of each part (atomically)."""
        path = Path(path)
        listing = {part: sorted(u for u, p in self.users.items() if p == part) for part in PARTS}
        body = {"seed": self.seed, "tune_fraction": self.tune_fraction, "test_fraction": self.test_fraction,
                "users": listing}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UserSplit":
        from rlhf.errors import DataError  # here, so this file loads on its own (see tests/test_data.py)

        path = Path(path)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            users = {str(u): part for part, ids in body.get("users", {}).items() for u in ids}
            return cls(int(body["seed"]), float(body["tune_fraction"]), float(body["test_fraction"]), users)
        except FileNotFoundError:
            raise DataError(f"{path}: no such split file") from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{path}: not a split file ({err}); expected "
                            '{"seed", "tune_fraction", "test_fraction", "users": {"train": [...], ...}}') from None


def split_for(data_path: str | os.PathLike, split_path: str | os.PathLike = "") -> UserSplit:
    """The split a stage uses: `split_path` if given, else `split.json` beside `data_path`, else the
    default hashed split (seed 0, 10% tune, 10% test users)."""
    if split_path:
        return UserSplit.load(split_path)
    beside = Path(data_path).parent / SPLIT_FILE
    if Path(data_path).is_file() and beside.is_file():
        return UserSplit.load(beside)
    return UserSplit()

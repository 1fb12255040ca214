"""One train / tune / test split by user id for every stage (rlhf.data.split.UserSplit)."""

from __future__ import annotations

import json

import pytest

from rlhf.data import PARTS, UserSplit, split_for
from rlhf.errors import DataError


def records_of(n_users: int, per_user: int = 3) -> list[dict]:
    return [{"prompt": f"u{u} p{i}", "user_id": f"user_{u:03d}"} for u in range(n_users) for i in range(per_user)]


def test_for_users_gives_exact_counts_and_each_user_one_part():
    split = UserSplit.for_users([f"user_{u:03d}" for u in range(60)], seed=0, tune_fraction=0.1, test_fraction=0.1)
    counts = {part: sum(p == part for p in split.users.values()) for part in PARTS}
    assert counts == {"train": 48, "tune": 6, "test": 6}
    parts = {part: {r["user_id"] for r in split.select(records_of(60), part)} for part in PARTS}
    assert not (parts["train"] & parts["tune"] or parts["train"] & parts["test"] or parts["tune"] & parts["test"])
    assert parts["test"] == {u for u, p in split.users.items() if p == "test"}
    # a few users still give every part one when its fraction is > 0
    small = UserSplit.for_users(["a", "b", "c"], tune_fraction=0.1, test_fraction=0.1)
    assert sorted(small.users.values()) == ["test", "train", "tune"]


def test_the_seed_moves_users_and_the_same_seed_does_not():
    users = [f"user_{u:03d}" for u in range(60)]
    assert UserSplit.for_users(users, seed=3).users == UserSplit.for_users(list(reversed(users)), seed=3).users
    assert UserSplit.for_users(users, seed=3).users != UserSplit.for_users(users, seed=4).users


def test_hashed_split_without_a_listing_keeps_users_whole_and_splits_other_records_one_by_one():
    split = UserSplit(seed=0, tune_fraction=0.2, test_fraction=0.2)
    records = records_of(200, per_user=4)
    for part in PARTS:
        chosen = split.select(records, part)
        for user in {r["user_id"] for r in chosen}:
            assert all(split.part_of(r) == part for r in records if r["user_id"] == user)
    test_users = {r["user_id"] for r in split.select(records, "test")}
    assert 20 <= len(test_users) <= 60  # about 40 of 200 users
    # records without a user id: each placed by its content, the same way every time
    texts = [{"text": f"line {i}", "user_id": None} for i in range(500)]
    parts = [split.part_of(r) for r in texts]
    assert parts == [UserSplit(seed=0, tune_fraction=0.2, test_fraction=0.2).part_of(r) for r in texts]
    assert 50 < parts.count("test") < 150 and 50 < parts.count("tune") < 150
    # a listed user goes where the listing says, whatever the hash
    listed = UserSplit(seed=0, users={"user_000": "test"})
    assert listed.part_of({"user_id": "user_000"}) == "test"


def test_write_load_round_trip_and_bad_files(tmp_path):
    split = UserSplit.for_users(["a", "b", "c", "d"], seed=7, tune_fraction=0.25, test_fraction=0.25)
    path = split.write(tmp_path / "split.json")
    body = json.loads(path.read_text())
    assert body["seed"] == 7 and sorted(sum(body["users"].values(), [])) == ["a", "b", "c", "d"]
    assert UserSplit.load(path) == split
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert split_for(tmp_path / "data.jsonl") == split  # found beside the data file
    assert split_for(tmp_path / "elsewhere" / "data.jsonl") == UserSplit()  # none there: the hashed default
    (tmp_path / "bad.json").write_text('{"seed": 0}')
    with pytest.raises(DataError, match="bad.json: not a split file"):
        UserSplit.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="leave room for train"):
        UserSplit(tune_fraction=0.5, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------
# Every stage trains on train users only, whatever its seeds (the bug: each stage drew its own split)
# ---------------------------------------------------------------------------------------------
class _Captured(Exception):
    """Raised by a patched data step once the stage has chosen its training records."""


def _fake_run_dir(path, role: str):
    (path / role).mkdir(parents=True, exist_ok=True)
    (path / role / "adapter_config.json").write_text("{}")  # enough for the stage's input check
    return path


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_test_user_in_any_stages_training_data_whatever_the_seeds(quick_toy_world, tmp_path, monkeypatch, seed):
    import types

    import rlhf.eval
    import rlhf.ppo.loop
    import rlhf.reward
    import rlhf.sft
    from rlhf.config import load_config
    from rlhf.eval import EvalConfig
    from rlhf.ppo import PPOConfig
    from rlhf.reward import RMConfig
    from rlhf.sft import SFTConfig

    world = quick_toy_world
    split = UserSplit.load(world.split)
    test_users = {u for u, part in split.users.items() if part == "test"}
    assert test_users
    seen: dict[str, list[dict]] = {}

    def capture(stage):
        def step(records, *args, **kwargs):
            seen[stage] = list(records)  # the first call of each stage is its training set
            raise _Captured
        return step

    monkeypatch.setattr(rlhf.sft, "tokenize_sft", capture("sft"))
    monkeypatch.setattr(rlhf.reward, "tokenize_rankings", capture("rm"))
    monkeypatch.setattr(rlhf.ppo.loop, "build_roles", lambda *a, **k: types.SimpleNamespace(tokenizer=None))
    monkeypatch.setattr(rlhf.ppo.loop, "PromptBatches", capture("ppo"))
    fake_model = types.SimpleNamespace(tokenizer=None, add_role=lambda *a, **k: None)
    monkeypatch.setattr(rlhf.eval, "RoleModel", lambda *a, **k: fake_model)
    monkeypatch.setattr(rlhf.eval, "tokenize_prompts", capture("eval"))
    sft_dir, rm_dir = _fake_run_dir(tmp_path / "sft", "policy"), _fake_run_dir(tmp_path / "rm", "reward")
    common = {"model.path": str(world.model), "model.quantization": "none", "device": "cpu", "seed": seed}
    stages = [
        (rlhf.sft.train, load_config(SFTConfig, overrides={**common, "data.path": str(world.sft),
                                                           "out_dir": str(tmp_path / "o_sft")})),
        (rlhf.reward.train, load_config(RMConfig, overrides={**common, "data.path": str(world.rankings),
                                                             "out_dir": str(tmp_path / "o_rm")})),
        (rlhf.ppo.loop.train, load_config(PPOConfig, overrides={
            **common, "data.path": str(world.prompts), "sft_dir": str(sft_dir), "rm_dir": str(rm_dir),
            "out_dir": str(tmp_path / "o_ppo")})),
        (rlhf.eval.evaluate, load_config(EvalConfig, overrides={
            **common, "seed": 1234 + seed, "data.path": str(world.prompts), "sft_dir": str(sft_dir),
            "rm_dir": str(rm_dir), "out_dir": str(tmp_path / "o_eval")})),
    ]
    for train, cfg in stages:
        with pytest.raises(_Captured):
            train(cfg)
    for stage in ("sft", "rm", "ppo"):
        users = {r["user_id"] for r in seen[stage]}
        assert users and not users & test_users, f"{stage} trains on test users {sorted(users & test_users)}"
        assert all(split.part_of(r) == "train" for r in seen[stage]), stage
    # and evaluation reads exactly the test users' prompts
    assert {r["user_id"] for r in seen["eval"]} == test_users

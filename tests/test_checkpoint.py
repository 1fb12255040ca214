"""Atomic checkpoints, RNG capture and the metrics log's crash/resume behaviour."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf.checkpoint import (MARKER, latest_checkpoint, load_trainer_state, resolve_resume, rng_state,
                             save_checkpoint, save_trainer_state, set_rng_state)
from rlhf.errors import ConfigError, RLHFError
from rlhf.metrics import MetricsLogger, read_metrics


def _write(state):
    def write(directory):
        save_trainer_state(directory, state)
    return write


def test_latest_skips_a_checkpoint_cut_off_mid_write(tmp_path):
    save_checkpoint(tmp_path, 10, _write({"step": 10}))
    # what a kill during `write` leaves behind: a temp dir, and a step dir without the marker
    (tmp_path / "checkpoints" / ".tmp-step-00000020").mkdir()
    (tmp_path / "checkpoints" / "step-00000030").mkdir()
    found = latest_checkpoint(tmp_path)
    assert found.name == "step-00000010"
    assert load_trainer_state(found) == {"step": 10}
    save_checkpoint(tmp_path, 40, _write({"step": 40}))
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000020").exists()  # stale temp dirs cleaned


def test_keep_last_and_same_step_twice(tmp_path):
    for step in (1, 2, 3, 3):
        save_checkpoint(tmp_path, step, _write({"step": step}), keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    assert all((tmp_path / "checkpoints" / n / MARKER).is_file() for n in names)


def test_a_failing_writer_publishes_nothing(tmp_path):
    def broken(directory):
        (directory / "half").write_text("x")
        raise OSError("disk full")
    with pytest.raises(RLHFError, match=r"checkpoint step 5 not saved: .*\.tmp-step-00000005: disk full"):
        save_checkpoint(tmp_path, 5, broken)
    assert latest_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000005").exists()  # cleaned up at once


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, "auto") is None
    path = save_checkpoint(tmp_path, 7, _write({}))
    assert resolve_resume(tmp_path, "auto") == path
    assert resolve_resume(tmp_path, str(path)) == path
    with pytest.raises(ConfigError, match="not a complete checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path))


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_metrics_append_truncate_on_resume_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path, "sft", tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"train_loss": torch.tensor(1.0 / step), "bad": float("nan")})
    logger.close()
    assert (tmp_path / "metrics.png").is_file()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["bad"] == "nan"
    # a crash cut the last line in half: reading stops there instead of failing
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "sft", "step": 6, "tra')
    assert len(read_metrics(tmp_path)) == 5
    resumed = MetricsLogger(tmp_path, "sft", resume_step=3, tensorboard=False)
    resumed.log(4, {"train_loss": 0.2})
    resumed.close(plot=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    other = MetricsLogger(tmp_path, "rm", tensorboard=False)  # another stage keeps the sft rows
    other.log(1, {"train_loss": 0.7})
    other.close(plot=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["stage"] for x in lines] == ["sft"] * 4 + ["rm"]


def test_resume_refuses_a_checkpoint_saved_under_another_config(tmp_path, caplog):
    from rlhf.sft import SFTConfig

    saved = SFTConfig(out_dir=str(tmp_path), epochs=16)
    save_checkpoint(tmp_path, 5, _write({"step": 5}), config=saved)
    assert (latest_checkpoint(tmp_path) / "config.yaml").is_file()
    same = SFTConfig(out_dir=str(tmp_path), epochs=16, resume="auto")
    assert resolve_resume(tmp_path, "auto", same).name == "step-00000005"
    # memory knobs and bookkeeping may change: the same update, in smaller pieces
    lighter = SFTConfig(out_dir=str(tmp_path / "moved"), epochs=16, micro_batch_size=8, log_every=1, device="cpu")
    assert resolve_resume(tmp_path, "auto", lighter) is not None
    changed = SFTConfig(out_dir=str(tmp_path), epochs=20)
    changed.optim.lr = 1e-4
    # optim.lr may change on a resume (the non-finite guard's advice), logged as a change; epochs may not
    with pytest.raises(ConfigError, match=r"\(epochs: 16 -> 20\)\. Resume with the same"):
        resolve_resume(tmp_path, "auto", changed)
    # a checkpoint without a config (written before configs were saved) resumes with a warning
    save_checkpoint(tmp_path / "old", 1, _write({"step": 1}))
    assert resolve_resume(tmp_path / "old", "auto", changed) is not None
    assert "cannot check that the resumed run uses the same config" in caplog.text

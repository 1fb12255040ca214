"""The stage runner (`rlhf.stage_run.StageRun`): who owns a run dir, the lock, reruns, Ctrl-C, and the
non-finite guard's weight check, on real (tiny) SFT, RM and PPO runs of the quick toy world."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlhf.cli
import rlhf.sft
from rlhf.checkpoint import CHECKPOINTS, config_changes
from rlhf.config import load_config, to_dict
from rlhf.errors import ConfigError, RLHFError
from rlhf.metrics import read_metrics
from rlhf.ppo import PPOConfig
from rlhf.ppo import train as train_ppo
from rlhf.reward import RMConfig
from rlhf.reward import train as train_rm
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft
from rlhf.stage_dirs import RunDirLock
from rlhf.stage_run import StageInterrupted
from rlhf.training import NonFiniteError, NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sft_fields(world, out: Path, **overrides) -> dict:
    return {"model.path": str(world.model), "model.quantization": "none", "data.path": str(world.sft),
            "out_dir": str(out), "device": "cpu", "epochs": 1, "batch_size": 16, "micro_batch_size": 16,
            "log_every": 1, "eval_every": 1000, "checkpoint_every": 2, "keep_last": 20, **overrides}


def sft_config(world, out: Path, **overrides) -> SFTConfig:
    return load_config(SFTConfig, overrides=sft_fields(world, out, **overrides))


def rm_config(world, out: Path, **overrides) -> RMConfig:
    return load_config(RMConfig, overrides={
        "model.path": str(world.model), "model.quantization": "none", "data.path": str(world.rankings),
        "out_dir": str(out), "device": "cpu", "batch_size": 8, "micro_batch_size": 8, "checkpoint_every": 1,
        "keep_last": 20, **overrides})


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C inside SFT training step `step` (0-based; one answer_nll_sum call per step)."""
    original, calls = rlhf.sft.answer_nll_sum, {"n": 0}

    def maybe_interrupt(model, batch):
        if torch.is_grad_enabled():
            if calls["n"] == step:
                raise KeyboardInterrupt
            calls["n"] += 1
        return original(model, batch)

    monkeypatch.setattr(rlhf.sft, "answer_nll_sum", maybe_interrupt)


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every checkpoint's safetensors files, by 'step-N/role/file:key'."""
    found = {}
    for path in sorted((run_dir / CHECKPOINTS).glob("step-*/**/*.safetensors")):
        for key, value in load_file(path).items():
            found[f"{path.relative_to(run_dir)}:{key}"] = value
    return found


# ------------------------------------------------------------------------------------------------
# Who owns a run dir
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sft(quick_toy_world, tmp_path_factory):
    return train_sft(sft_config(quick_toy_world, tmp_path_factory.mktemp("finished") / "sft"))


def test_rerun_into_a_finished_run_says_done_and_trains_nothing(quick_toy_world, finished_sft, caplog):
    done_mtime = (finished_sft / "DONE").stat().st_mtime_ns
    rows = read_metrics(finished_sft)
    with caplog.at_level(logging.INFO, logger="rlhf.stage_run"):
        assert train_sft(sft_config(quick_toy_world, finished_sft)) == finished_sft
    assert "this sft run already finished" in caplog.text
    assert (finished_sft / "DONE").stat().st_mtime_ns == done_mtime
    assert read_metrics(finished_sft) == rows


def test_another_config_into_a_finished_run_is_refused(quick_toy_world, finished_sft):
    rows = read_metrics(finished_sft)
    with pytest.raises(ConfigError, match=r"run dir .* holds a sft run with another config \(epochs: 1 -> 2\); "
                                          r"choose another --out, or pass --overwrite"):
        train_sft(sft_config(quick_toy_world, finished_sft, epochs=2))
    assert read_metrics(finished_sft) == rows


def test_another_stage_into_a_run_dir_is_refused(quick_toy_world, finished_sft):
    config_before = (finished_sft / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds a sft run, not a rm one; choose another --out, or pass --overwrite"):
        train_rm(rm_config(quick_toy_world, finished_sft))
    assert (finished_sft / "config.yaml").read_text() == config_before


def test_overwrite_says_what_it_removes_and_starts_over(quick_toy_world, tmp_path, caplog):
    out = train_sft(sft_config(quick_toy_world, tmp_path / "sft"))
    n_rows = len(read_metrics(out))
    n_checkpoints = len(list((out / CHECKPOINTS).glob("step-*")))
    with caplog.at_level(logging.WARNING, logger="rlhf.stage_dirs"):
        train_sft(sft_config(quick_toy_world, out, epochs=2, overwrite=True, checkpoint_every=100))
    [message] = [r.getMessage() for r in caplog.records if "--overwrite" in r.getMessage()]
    assert f"checkpoints/ ({n_checkpoints} checkpoints)" in message
    assert f"metrics.jsonl ({n_rows} rows)" in message and "policy/" in message and "DONE" in message
    assert sorted(p.name for p in (out / CHECKPOINTS).glob("step-*")) == [f"step-{2 * n_rows:08d}"]  # only new ones
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 2 * n_rows + 1))


def test_a_locked_run_dir_fails_at_once_with_the_holders_pid(quick_toy_world, tmp_path):
    import os

    out = tmp_path / "sft"
    out.mkdir()
    holder = RunDirLock(out)
    holder.acquire()
    try:
        with pytest.raises(RLHFError, match=rf"run dir {out} is in use by pid {os.getpid()}"):
            train_sft(sft_config(quick_toy_world, out))
    finally:
        holder.release()
    assert not (out / "config.yaml").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------
# Ctrl-C and the rerun that follows
# ------------------------------------------------------------------------------------------------
def test_ctrl_c_before_the_first_checkpoint_says_a_rerun_starts_over(quick_toy_world, tmp_path, monkeypatch):
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(StageInterrupted, match=r"^interrupted at step 3; no checkpoint yet \(checkpoint_every=200\): "
                                               r"rerunning starts over$"):
        train_sft(sft_config(quick_toy_world, tmp_path / "sft", checkpoint_every=200))


def test_ctrl_c_then_the_same_command_resumes_from_the_newest_checkpoint(quick_toy_world, tmp_path, monkeypatch,
                                                                          capsys, caplog):
    reference = train_sft(sft_config(quick_toy_world, tmp_path / "reference"))
    out = tmp_path / "sft"
    args = ["sft"] + [f"--{key}={value}" for key, value in sft_fields(quick_toy_world, out).items()]
    interrupt_at_step(monkeypatch, 5)
    assert rlhf.cli.main(args) == 130
    assert ("rlhf sft: interrupted at step 5; the newest checkpoint is step 4: rerun the same command to continue "
            "from it") in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="rlhf.stage_run"):
        assert rlhf.cli.main(args) == 0
    assert "sft: resumed from" in caplog.text and "step-00000004 at step 4" in caplog.text
    # the interrupted run's checkpoints were kept (none pruned), its log was continued, not restarted
    assert read_metrics(out) == read_metrics(reference)
    for role_file in ("policy/adapter_model.safetensors",):
        assert all(torch.equal(a, b) for a, b in zip(load_file(out / role_file).values(),
                                                      load_file(reference / role_file).values()))


def test_resume_off_into_an_unfinished_run_is_refused_with_the_fix(quick_toy_world, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(StageInterrupted):
        train_sft(sft_config(quick_toy_world, out))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"holds an unfinished sft run of this config; pass --resume auto to "
                                          r"continue it from its newest checkpoint, or --overwrite to start over"):
        train_sft(sft_config(quick_toy_world, out, resume="never"))


# ------------------------------------------------------------------------------------------------
# The non-finite guard checks the weights; a resume may lower the rate
# ------------------------------------------------------------------------------------------------
def test_a_step_that_makes_the_weights_non_finite_is_undone_exactly():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    guard = NonFiniteGuard(max_in_a_row=2)
    loss, norm = torch.tensor(1.0), torch.tensor(1.0)

    def backward():
        optimizer.zero_grad()
        (weight ** 2).sum().backward()

    backward()
    optimizer.param_groups[0]["lr"] = float("inf")
    assert not guard.step(optimizer, loss, norm, 0, "first")  # the first step, undone: no Adam state left
    assert torch.equal(weight.detach(), torch.tensor([1.0, -2.0, 3.0])) and not optimizer.state
    optimizer.param_groups[0]["lr"] = 0.1
    assert guard.step(optimizer, loss, norm, 1, "good")
    good_weight = weight.detach().clone()
    good_state = {k: v.clone() for k, v in optimizer.state[weight].items()}
    backward()
    optimizer.param_groups[0]["lr"] = float("inf")
    assert not guard.step(optimizer, loss, norm, 2, "bad")
    with pytest.raises(NonFiniteError, match=r"step 3: 2 optimiser steps in a row .*gave non-finite weights .*"
                                             r"Lower optim.lr and rerun the same command with --optim.lr"):
        guard.step(optimizer, loss, norm, 3, "bad again")
    assert torch.equal(weight.detach(), good_weight)  # bitwise the weights and Adam state of the good step
    assert good_state.keys() == optimizer.state[weight].keys()
    assert all(torch.equal(optimizer.state[weight][k], v) for k, v in good_state.items())
    assert guard.skipped_total == 3


def assert_finite_checkpoints(run_dir: Path) -> None:
    tensors = checkpoint_tensors(run_dir)
    assert tensors, f"no checkpoint in {run_dir}"
    bad = [name for name, value in tensors.items() if not torch.isfinite(value).all()]
    assert not bad, f"non-finite checkpointed weights: {bad[:3]}"


@pytest.mark.parametrize("lr", [math.inf, 1e39])  # 1e39: finite, but the update overflows fp32
def test_sft_huge_rate_never_checkpoints_non_finite_weights_and_a_lower_rate_resumes(quick_toy_world, tmp_path,
                                                                                   lr, caplog):
    out = tmp_path / "sft"
    with pytest.raises(NonFiniteError, match="The last good state is in the newest checkpoint"):
        train_sft(sft_config(quick_toy_world, out, checkpoint_every=1, max_nonfinite_in_a_row=2, **{"optim.lr": lr}))
    assert_finite_checkpoints(out)
    with caplog.at_level(logging.WARNING, logger="rlhf.checkpoint"):
        train_sft(sft_config(quick_toy_world, out, checkpoint_every=1, max_nonfinite_in_a_row=2,
                             **{"optim.lr": 1e-3}))
    assert f"resume: optim.lr changed (optim.lr: {lr!r} -> 0.001)" in caplog.text
    assert (out / "DONE").is_file()
    assert_finite_checkpoints(out)
    lrs = [r["lr"] for r in read_metrics(out) if isinstance(r.get("lr"), float)]
    assert max(lrs[-3:]) <= 1e-3  # the resumed steps ran at the lower rate


def test_rm_infinite_rate_never_checkpoints_non_finite_weights_and_a_lower_rate_resumes(quick_toy_world, tmp_path):
    out = tmp_path / "rm"
    with pytest.raises(NonFiniteError, match="The last good state is in the newest checkpoint"):
        train_rm(rm_config(quick_toy_world, out, max_nonfinite_in_a_row=2, **{"optim.lr": math.inf}))
    assert_finite_checkpoints(out)
    train_rm(rm_config(quick_toy_world, out, max_nonfinite_in_a_row=2, **{"optim.lr": 1e-3}))
    assert (out / "DONE").is_file()
    assert_finite_checkpoints(out)


def test_ppo_infinite_rate_never_checkpoints_non_finite_weights_and_a_lower_rate_resumes(quick_toy_world, tmp_path):
    sft = train_sft(sft_config(quick_toy_world, tmp_path / "sft", checkpoint_every=100))
    rm = train_rm(rm_config(quick_toy_world, tmp_path / "rm", sft_dir=str(sft), checkpoint_every=100))
    fields = {"model.path": str(quick_toy_world.model), "model.quantization": "none",
              "data.path": str(quick_toy_world.prompts), "sft_dir": str(sft), "rm_dir": str(rm),
              "out_dir": str(tmp_path / "ppo"), "device": "cpu", "iterations": 4, "rollout.batch_size": 4,
              "mini_batch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1, "rollout.max_new_tokens": 6,
              "checkpoint_every": 1, "keep_last": 20, "max_nonfinite_in_a_row": 2}
    with pytest.raises(NonFiniteError, match="The last good state is in the newest checkpoint"):
        train_ppo(load_config(PPOConfig, overrides={**fields, "optim.lr": math.inf}))
    assert_finite_checkpoints(tmp_path / "ppo")
    train_ppo(load_config(PPOConfig, overrides={**fields, "optim.lr": 1e-5}))
    assert (tmp_path / "ppo" / "DONE").is_file()
    assert_finite_checkpoints(tmp_path / "ppo")


def test_a_resume_may_change_the_rate_but_not_what_makes_another_run():
    saved = to_dict(SFTConfig(epochs=16))
    lower = SFTConfig(epochs=16, max_nonfinite_in_a_row=5, eval_every=7, log_every=3,
                      optim=dataclasses.replace(SFTConfig().optim, lr=1e-4, max_grad_norm=0.5))
    refused, adjusted = config_changes(saved, lower)
    assert refused == []
    assert adjusted == ["eval_every: 100 -> 7", "max_nonfinite_in_a_row: 3 -> 5", "optim.lr: 0.002 -> 0.0001",
                        "optim.max_grad_norm: 1.0 -> 0.5"]
    for name, value in (("epochs", 17), ("batch_size", 64), ("seed", 1)):
        refused, _ = config_changes(saved, dataclasses.replace(SFTConfig(epochs=16), **{name: value}))
        assert [line.split(":")[0] for line in refused] == [name]
    refused, _ = config_changes(saved, SFTConfig(epochs=16, optim=dataclasses.replace(SFTConfig().optim,
                                                                                      warmup_steps=0)))
    assert refused == ["optim.warmup_steps: 20 -> 0"]


def test_a_stop_checkpoint_holds_a_full_count_and_the_rerun_starts_a_new_one():
    guard = NonFiniteGuard(max_in_a_row=3)
    guard.load_state_dict({"in_a_row": 3, "skipped_total": 5})  # written by the guard's stop
    assert (guard.in_a_row, guard.skipped_total) == (0, 5)
    guard.load_state_dict({"in_a_row": 2, "skipped_total": 5})  # a periodic checkpoint mid-streak: kept
    assert guard.in_a_row == 2


def test_an_out_of_memory_outside_the_micro_batches_names_the_settings_to_lower(quick_toy_world, tmp_path,
                                                                               monkeypatch):
    """The validation pass is not a training step (no halving), but its OOM still gets the stage's message."""
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rlhf.sft, "evaluate_loss", oom)
    with pytest.raises(RLHFError, match=r"out of memory during SFT training; lower one of: micro_batch_size, "
                                        r"data.max_length \(or set auto_halve_micro_batch=true"):
        train_sft(sft_config(quick_toy_world, tmp_path / "sft", eval_every=1))


@pytest.mark.parametrize("failing", ["mkdir", "config", "metrics"])
def test_os_errors_on_the_run_dir_are_one_line(quick_toy_world, tmp_path, monkeypatch, failing):
    """Read-only or full disks (issue 14 point 7): one line naming the path and the cause, never a traceback;
    we run as root, so the OS error is injected where the run dir is created, its config saved, or metrics
    written mid-run."""
    import errno

    import rlhf.metrics
    import rlhf.stage_run

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "sft"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "mkdir":
        monkeypatch.setattr(Path, "mkdir", read_only)
    elif failing == "config":
        monkeypatch.setattr(rlhf.stage_run, "save_config", read_only)
    else:
        monkeypatch.setattr(rlhf.metrics.MetricsLogger, "log", no_space)
    cause = "no space left on device" if failing == "metrics" else "read-only file system"
    with pytest.raises(RLHFError, match=f"cannot write the run dir: .*: {cause}; free space") as err:
        train_sft(sft_config(quick_toy_world, tmp_path / "sft", epochs=1))
    assert "\n" not in str(err.value)

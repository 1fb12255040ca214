"""Numeric guards and out-of-memory handling, with NaNs and OOMs injected into real (tiny) stage runs.

A non-finite loss skips the optimiser step (the weights stay bitwise those of the step before), is
counted in `skipped_steps` and logged with the batch's identity; `max_nonfinite_in_a_row` of them
stop the run with NonFiniteError and a checkpoint of the last good weights. An OOM names the
settings to lower; with `auto_halve_micro_batch` every stage halves the micro-batch and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlhf.ppo.update
import rlhf.reward
import rlhf.sft
from rlhf.checkpoint import CHECKPOINTS
from rlhf.config import load_config
from rlhf.errors import RLHFError
from rlhf.metrics import read_metrics
from rlhf.ppo import PPOConfig
from rlhf.ppo import train as train_ppo
from rlhf.reward import RMConfig
from rlhf.reward import train as train_rm
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft
from rlhf.training import NonFiniteError

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adapter(run_dir: Path, step: int, role: str = "policy") -> dict[str, torch.Tensor]:
    return load_file(run_dir / CHECKPOINTS / f"step-{step:08d}" / role / "adapter_model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sft_config(world, out: Path, **overrides) -> SFTConfig:
    fields = {"model.path": str(world.model), "model.quantization": "none", "data.path": str(world.sft),
              "out_dir": str(out), "device": "cpu", "epochs": 1, "batch_size": 16, "micro_batch_size": 16,
              "log_every": 1, "eval_every": 1000, "checkpoint_every": 1, "keep_last": 20}
    return load_config(SFTConfig, overrides={**fields, **overrides})


def nan_on_calls(monkeypatch, module, name: str, bad_calls) -> None:
    """Make the training-time calls number `bad_calls` (0-based, gradient enabled) of module.name return NaN."""
    original = getattr(module, name)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation passes are not training steps
            return out
        index, calls["n"] = calls["n"], calls["n"] + 1
        if bad_calls(index):
            return (out[0] * float("nan"),) + tuple(out[1:])
        return out

    monkeypatch.setattr(module, name, poisoned)


def test_sft_nan_step_is_skipped_counted_and_logged(quick_toy_world, tmp_path, monkeypatch, caplog):
    nan_on_calls(monkeypatch, rlhf.sft, "answer_nll_sum", lambda i: i == 2)  # the third step (index 2)
    with caplog.at_level(logging.WARNING, logger="rlhf.training"):
        out = train_sft(sft_config(quick_toy_world, tmp_path / "sft"))
    assert same(adapter(out, 2), adapter(out, 3))  # step index 2 changed nothing
    assert not same(adapter(out, 3), adapter(out, 4))  # and training went on
    skipped = {r["step"]: r["skipped_steps"] for r in read_metrics(out) if "skipped_steps" in r}
    assert skipped[2] == 0 and skipped[3] == 1 and max(skipped.values()) == 1
    [message] = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert "step 2:" in message and "sft.jsonl:" in message  # the batch's records, by file:line
    assert (out / "DONE").is_file()


def test_sft_stops_after_max_nonfinite_in_a_row_with_a_good_checkpoint(quick_toy_world, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, rlhf.sft, "answer_nll_sum", lambda i: i >= 4)  # diverged from step index 4 on
    with pytest.raises(NonFiniteError, match=r"step 5: 2 optimiser steps in a row had a non-finite loss "
                                             r"or gradient .*The last good state is in the newest checkpoint"):
        train_sft(sft_config(quick_toy_world, tmp_path / "sft", max_nonfinite_in_a_row=2))
    out = tmp_path / "sft"
    newest = sorted((out / CHECKPOINTS).glob("step-*"))[-1]
    assert newest.name == "step-00000005"
    assert same(adapter(out, 5), adapter(out, 4))  # the last good weights (after step index 3)
    assert not (out / "DONE").exists()


def test_sft_oom_names_the_settings_to_lower(quick_toy_world, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(rlhf.sft, "answer_nll_sum", oom)
    with pytest.raises(RLHFError, match=r"out of memory during SFT training; lower one of: micro_batch_size, "
                                        r"data.max_length \(or set auto_halve_micro_batch=true"):
        train_sft(sft_config(quick_toy_world, tmp_path / "sft"))


def test_rm_oom_names_the_settings_to_lower(quick_toy_world, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(rlhf.reward, "ranking_batch_loss", oom)
    cfg = load_config(RMConfig, overrides={
        "model.path": str(quick_toy_world.model), "model.quantization": "none", "device": "cpu",
        "data.path": str(quick_toy_world.rankings), "out_dir": str(tmp_path / "rm")})
    with pytest.raises(RLHFError, match=r"out of memory during reward-model training; lower one of: "
                                        r"micro_batch_size, data.max_length \(or set auto_halve_micro_batch=true"):
        train_rm(cfg)


def test_sft_auto_halve_goes_on_with_the_same_update(quick_toy_world, tmp_path, monkeypatch, caplog):
    """An OOM on micro-batches above 4 rows: the step is redone at 8, then 4 rows, and the run ends with
    the weights of a run that used 4-row micro-batches from the start (the same rows, the same sums)."""
    original = rlhf.sft.answer_nll_sum

    def oom_above_4_rows(model, batch):
        if torch.is_grad_enabled() and batch["input_ids"].shape[0] > 4:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return original(model, batch)

    reference = train_sft(sft_config(quick_toy_world, tmp_path / "micro4", micro_batch_size=4, checkpoint_every=100))
    monkeypatch.setattr(rlhf.sft, "answer_nll_sum", oom_above_4_rows)
    with caplog.at_level(logging.WARNING, logger="rlhf.training"):
        halved = train_sft(sft_config(quick_toy_world, tmp_path / "halved", auto_halve_micro_batch=True,
                                      checkpoint_every=100))
    assert [r.getMessage() for r in caplog.records if "halved" in r.getMessage()] == [
        "out of memory during SFT training; micro_batch_size halved to 8",
        "out of memory during SFT training; micro_batch_size halved to 4"]
    load = lambda run: load_file(run / "policy" / "adapter_model.safetensors")  # noqa: E731
    assert same(load(halved), load(reference))


# ------------------------------------------------------------------------------------------------
# PPO: one tiny SFT and RM run (in-process), then PPO with one optimiser step per iteration
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_rm(quick_toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    sft = train_sft(sft_config(quick_toy_world, root / "sft", checkpoint_every=100))
    rm = train_rm(load_config(RMConfig, overrides={
        "model.path": str(quick_toy_world.model), "model.quantization": "none",
        "data.path": str(quick_toy_world.rankings), "sft_dir": str(sft), "out_dir": str(root / "rm"),
        "device": "cpu", "batch_size": 8, "micro_batch_size": 8}))
    return sft, rm


def ppo_config(world, sft_rm, out: Path, **overrides) -> PPOConfig:
    sft, rm = sft_rm
    fields = {"model.path": str(world.model), "model.quantization": "none", "data.path": str(world.prompts),
              "sft_dir": str(sft), "rm_dir": str(rm), "out_dir": str(out), "device": "cpu", "iterations": 4,
              "rollout.batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1,
              "rollout.max_new_tokens": 6, "checkpoint_every": 1, "keep_last": 20}
    return load_config(PPOConfig, overrides={**fields, **overrides})


def test_ppo_nan_update_is_skipped_counted_and_logged(quick_toy_world, sft_rm, tmp_path, monkeypatch, caplog):
    nan_on_calls(monkeypatch, rlhf.ppo.update, "micro_batch_losses", lambda i: i == 1)  # iteration 1's update
    with caplog.at_level(logging.WARNING, logger="rlhf.training"):
        out = train_ppo(ppo_config(quick_toy_world, sft_rm, tmp_path / "ppo"))
    for role in ("policy", "value"):
        assert same(adapter(out, 1, role), adapter(out, 2, role))
        assert not same(adapter(out, 2, role), adapter(out, 3, role))
    assert [r["skipped_steps"] for r in read_metrics(out)] == [0, 1, 1, 1]
    [message] = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert "step 1:" in message and "iteration 1 epoch 0 rows [" in message


def test_ppo_stops_after_max_nonfinite_in_a_row_with_a_good_checkpoint(quick_toy_world, sft_rm, tmp_path,
                                                                       monkeypatch):
    nan_on_calls(monkeypatch, rlhf.ppo.update, "micro_batch_losses", lambda i: i >= 2)
    out = tmp_path / "ppo"
    with pytest.raises(NonFiniteError, match="step 3: 2 optimiser steps in a row had a non-finite loss"):
        train_ppo(ppo_config(quick_toy_world, sft_rm, out, max_nonfinite_in_a_row=2))
    assert sorted(p.name for p in (out / CHECKPOINTS).glob("step-*"))[-1] == "step-00000003"
    for role in ("policy", "value"):
        assert same(adapter(out, 3, role), adapter(out, 2, role))
    assert not (out / "DONE").exists()


def oom_above(monkeypatch, rows: int) -> None:
    """micro_batch_losses runs out of memory on micro-batches of more than `rows` rows."""
    original = rlhf.ppo.update.micro_batch_losses

    def maybe_oom(model, mb, s, ptx=None):
        if mb.sequences.shape[0] > rows:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return original(model, mb, s, ptx)

    monkeypatch.setattr(rlhf.ppo.update, "micro_batch_losses", maybe_oom)


def test_ppo_oom_names_the_settings_to_lower(quick_toy_world, sft_rm, tmp_path, monkeypatch):
    oom_above(monkeypatch, 2)
    with pytest.raises(RLHFError, match=r"out of memory during PPO iteration; lower one of: micro_batch_size, "
                                        r"rollout.batch_size, rollout.max_new_tokens, data.max_prompt_length "
                                        r"\(or set auto_halve_micro_batch=true"):
        train_ppo(ppo_config(quick_toy_world, sft_rm, tmp_path / "ppo"))


def test_ppo_auto_halve_micro_batch_goes_on(quick_toy_world, sft_rm, tmp_path, monkeypatch, caplog):
    reference = train_ppo(ppo_config(quick_toy_world, sft_rm, tmp_path / "reference", iterations=2,
                                     micro_batch_size=1))
    oom_above(monkeypatch, 1)
    with caplog.at_level(logging.WARNING, logger="rlhf.training"):
        out = train_ppo(ppo_config(quick_toy_world, sft_rm, tmp_path / "halved", iterations=2,
                                   auto_halve_micro_batch=True))
    halvings = [r.getMessage() for r in caplog.records if "halved" in r.getMessage()]
    assert halvings == ["out of memory during PPO iteration; micro_batch_size halved to 2",
                        "out of memory during PPO iteration; micro_batch_size halved to 1"]
    assert (out / "DONE").is_file()
    # the same mini-batches, accumulated in smaller pieces: the update matches a micro_batch_size=1 run
    for role in ("policy", "value"):
        expected = load_file(reference / role / "adapter_model.safetensors")
        got = load_file(out / role / "adapter_model.safetensors")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)

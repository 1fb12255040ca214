"""Stages 1 and 2 on the quick toy world, end to end: SFT learns the demonstrations, the reward model
trained from the SFT network ranks held-out answers well above chance, its output is shifted so the
demonstrations score 0 (and the shift is saved), each ranked answer costs one forward row, and the
`rlhf` command line runs both stages and refuses a bad value in one line.

One SFT run and one RM run (module-scoped, quantization none, CPU) are shared by the in-process tests;
the command-line test runs its own tiny SFT and RM as `python -m rlhf` subprocesses.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import rlhf.sft
from rlhf.config import load_config
from rlhf.data import collate_rankings, load_records, split_for, tokenize_rankings, tokenize_sft
from rlhf.metrics import read_metrics
from rlhf.models import RoleModel
from rlhf.reward import (RMConfig, demonstration_scores, evaluate_rankings, normalise, ranking_batch_loss)
from rlhf.reward import train as train_rm
from rlhf.sft import SFTConfig, evaluate_loss
from rlhf.sft import train as train_sft

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# measured on the quick world with the settings below (seed 0, CPU): SFT takes the held-out answer NLL
# from 3.04 (untrained adapter) to 2.46; the RM reaches 0.70 held-out pairwise accuracy (0.68-0.72 over
# RM seeds 0-3), where one RM epoch instead of eight gives 0.60 and would fail this test
MIN_VAL_LOSS_DROP = 0.4
MIN_RM_ACCURACY = 0.65  # chance is 0.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sft_config(world, out: Path, **overrides) -> SFTConfig:
    fields = {"model.path": str(world.model), "model.quantization": "none", "data.path": str(world.sft),
              "out_dir": str(out), "device": "cpu", "epochs": 3, "batch_size": 16, "micro_batch_size": 16,
              "log_every": 2, "eval_every": 1000, "checkpoint_every": 1000}
    return load_config(SFTConfig, overrides={**fields, **overrides})


def rm_config(world, sft_dir: Path, out: Path, **overrides) -> RMConfig:
    fields = {"model.path": str(world.model), "model.quantization": "none", "data.path": str(world.rankings),
              "data.demonstrations": str(world.sft), "sft_dir": str(sft_dir), "out_dir": str(out), "device": "cpu",
              "epochs": 8, "batch_size": 8, "micro_batch_size": 8, "checkpoint_every": 1000}
    return load_config(RMConfig, overrides={**fields, **overrides})


@pytest.fixture(scope="module")
def sft_run(quick_toy_world, tmp_path_factory) -> tuple[SFTConfig, Path]:
    cfg = sft_config(quick_toy_world, tmp_path_factory.mktemp("stages") / "sft")
    return cfg, train_sft(cfg)


@pytest.fixture(scope="module")
def rm_run(quick_toy_world, sft_run, tmp_path_factory) -> tuple[RMConfig, Path]:
    cfg = rm_config(quick_toy_world, sft_run[1], tmp_path_factory.mktemp("stages") / "rm")
    return cfg, train_rm(cfg)


@pytest.fixture(scope="module")
def saved_rm(rm_run) -> RoleModel:
    """A fresh base with the saved reward adapter and head loaded from disk (nothing kept from training)."""
    cfg, out = rm_run
    model = RoleModel(cfg.model, device=CPU)
    model.add_role("reward", adapter_dir=out / "reward", head="reward")
    return model


def val_split(records_path: Path, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, tune) records as the stages split them: the split.json beside the data file."""
    records, split = load_records(records_path, kind), split_for(records_path)
    return split.select(records, "train"), split.select(records, "tune")


def explicit_pairs_loss(groups: list[torch.Tensor]) -> tuple[float, float]:
    """(mean over prompts of the mean over its C(K, 2) pairs of -log sigmoid(r_w - r_l), pair accuracy);
    each group's scores best first. The reference formula of tests/test_ranking_loss.py."""
    per_prompt, right, pairs = [], 0, 0
    for scores in groups:
        combos = list(itertools.combinations(range(len(scores)), 2))
        per_prompt.append(sum(-F.logsigmoid(scores[w] - scores[l]) for w, l in combos) / len(combos))
        right += sum(bool(scores[w] > scores[l]) for w, l in combos)
        pairs += len(combos)
    return float(sum(per_prompt) / len(per_prompt)), right / pairs


# ------------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------------
def test_sft_lowers_the_validation_loss_and_writes_a_complete_run_dir(sft_run):
    """Held-out users' answer NLL falls well below the untrained adapter's (the pretrained base's), the
    saved adapter is the trained one, and the run dir holds everything the layout promises."""
    cfg, out = sft_run
    _, val_records = val_split(Path(cfg.data.path), "sft")
    assert val_records

    def val_loss(adapter_dir: Path | None) -> float:
        model = RoleModel(cfg.model, device=CPU)
        model.add_role("policy", adapter_dir=adapter_dir)  # fresh (None): LoRA adds exactly zero, the base
        val_examples, _ = tokenize_sft(val_records, model.tokenizer, cfg.data.max_length)
        return evaluate_loss(model, val_examples, 16, model.tokenizer.pad_token_id, CPU, "auto")["val_loss"]

    before, after = val_loss(None), val_loss(out / "policy")

    done = json.loads((out / "DONE").read_text())
    logged = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    print(f"SFT val loss: untrained {before:.3f}, logged {[round(v, 3) for v in logged]}, saved adapter {after:.3f}")
    assert len(logged) == cfg.epochs  # one validation pass at each epoch's end
    assert after == pytest.approx(done["val_loss"], abs=1e-5)  # the adapter on disk is the one evaluated
    assert logged[-1] == pytest.approx(done["val_loss"], abs=1e-5)
    assert before - after >= MIN_VAL_LOSS_DROP
    assert logged[-1] < logged[0] < before

    # the run dir: peft adapter, resolved config, metrics, plot, DONE
    adapter_config = json.loads((out / "policy" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == cfg.model.lora_r
    weights = load_file(out / "policy" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # lora_B starts at zero: trained weights
    assert (out / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    assert {r["stage"] for r in read_metrics(out)} == {"sft"}
    assert done["steps"] == cfg.epochs * 11  # 171 training demonstrations / 16 -> 11 steps an epoch
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert load_config(SFTConfig, out / "config.yaml") == cfg  # resolved: reloads to the same config
    assert saved["model"]["quantization"] == "none" and saved["epochs"] == 3
    # overriding model.path/quantization keeps the rest of SFT's own model default (dropout 0.2)
    assert saved["model"]["lora_dropout"] == 0.2
    assert saved["optim"] == dataclasses.asdict(SFTConfig().optim)


# ------------------------------------------------------------------------------------------------
# Reward model
# ------------------------------------------------------------------------------------------------
def test_rm_from_sft_ranks_held_out_answers_well_above_chance(rm_run):
    """Trained on the rankings from the SFT adapter, the RM orders held-out users' answer pairs right
    well above chance (0.5), and its run dir holds the adapter with its head."""
    cfg, out = rm_run
    done = json.loads((out / "DONE").read_text())
    rows = [r for r in read_metrics(out) if "val_pairwise_accuracy" in r]
    print(f"RM val pairwise accuracy {done['val_pairwise_accuracy']:.3f} (val loss {done['val_loss']:.3f})")
    assert done["val_pairwise_accuracy"] >= MIN_RM_ACCURACY
    # the last training-loop evaluation and the one after normalisation: shifting every score by the
    # offset moves the mean by exactly the offset and leaves every pair's order alone
    trained, normalised = rows[-2], rows[-1]
    assert trained["step"] == normalised["step"] == done["steps"] and "offset" in normalised
    assert normalised["val_pairwise_accuracy"] == pytest.approx(trained["val_pairwise_accuracy"])
    assert normalised["val_score_mean"] == pytest.approx(trained["val_score_mean"] + done["offset"], abs=1e-4)
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors"):
        assert (out / "reward" / name).is_file(), name
    assert (out / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    assert load_config(RMConfig, out / "config.yaml") == cfg


def test_rm_is_normalised_so_demonstrations_score_zero_and_the_offset_is_saved(quick_toy_world, rm_run, saved_rm):
    """Scored by the RM reloaded from disk, the demonstrations' mean is 0: the offset was set after
    training and saved with the head. The reloaded RM also gives the accuracy the run reported."""
    cfg, out = rm_run
    done = json.loads((out / "DONE").read_text())
    head_file = load_file(out / "reward" / "head.safetensors")
    assert set(head_file) == {"linear.weight", "linear.bias", "offset"}
    assert head_file["offset"].item() == pytest.approx(done["offset"])
    assert abs(done["offset"]) > 0.1  # a shift that matters: without it the mean below would be far from 0
    assert saved_rm.head("reward").offset.item() == pytest.approx(done["offset"])

    tokenizer, pad_id = saved_rm.tokenizer, saved_rm.tokenizer.pad_token_id
    demos, _ = tokenize_sft(load_records(quick_toy_world.sft, "sft"), tokenizer, cfg.data.max_length)
    assert len(demos) == done["n_demonstrations"] == 200
    scores = demonstration_scores(saved_rm, demos, 32, pad_id, CPU, "auto")
    print(f"RM demonstration score mean after normalisation {scores.mean().item():.2e}, offset {done['offset']:.3f}")
    assert abs(scores.mean().item()) < 1e-4
    assert scores.std().item() == pytest.approx(done["demo_score_std"], rel=1e-4)

    _, val_records = val_split(quick_toy_world.rankings, "rankings")
    val_examples, _ = tokenize_rankings(val_records, tokenizer, cfg.data.max_length)
    reloaded = evaluate_rankings(saved_rm, val_examples, 8, pad_id, CPU, "auto")
    assert reloaded["val_pairwise_accuracy"] == pytest.approx(done["val_pairwise_accuracy"], abs=1e-6)
    assert reloaded["val_score_mean"] == pytest.approx(done["val_score_mean"], abs=1e-4)


def test_normalise_without_demonstrations_centres_the_top_ranked_answers(quick_toy_world, rm_run, saved_rm):
    """With no demonstrations file, the labellers' best answers stand in: they are what scores 0 on average."""
    cfg, _ = rm_run
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, demonstrations=""))
    rankings = load_records(quick_toy_world.rankings, "rankings")
    head = saved_rm.head("reward")
    saved_offset = head.offset.clone()
    try:
        stats = normalise(saved_rm, cfg, rankings)
        best = [{"prompt": r["prompt"], "completion": r["responses"][0]} for r in rankings]
        examples, _ = tokenize_sft(best, saved_rm.tokenizer, cfg.data.max_length)
        scores = demonstration_scores(saved_rm, examples, 32, saved_rm.tokenizer.pad_token_id, CPU, "auto")
    finally:
        with torch.no_grad():
            head.offset.copy_(saved_offset)
    assert stats["n_demonstrations"] == len(rankings) == 100
    assert abs(scores.mean().item()) < 1e-4
    assert stats["offset"] != pytest.approx(saved_offset.item(), abs=1e-3)  # a different set, a different shift


@pytest.mark.parametrize("k", [4, None], ids=["k4", "mixed-k"])
def test_k_answers_cost_k_forward_rows_and_the_loss_is_the_explicit_pairwise_loss(quick_toy_world, saved_rm,
                                                                                  monkeypatch, k):
    """One `ranking_batch_loss` call sends sum(K) rows through the base once (not one row per pair
    side, K(K-1)); the loss and accuracy are the explicit loop over each prompt's C(K, 2) pairs of
    those scores; each row's score is that answer's score when scored alone, unpadded."""
    records = load_records(quick_toy_world.rankings, "rankings")[:6]
    if k is not None:
        records = [{**r, "responses": r["responses"][:k]} for r in records]  # the K best, still best first
    sizes = [len(r["responses"]) for r in records]
    assert min(sizes) >= 4 and (k is not None or len(set(sizes)) > 1)
    examples, _ = tokenize_rankings(records, saved_rm.tokenizer, 64)
    assert len(examples) == len(records)
    batch = collate_rankings(examples, saved_rm.tokenizer.pad_token_id)

    scored_rows, embedded_rows = [], []
    original = RoleModel.reward_scores

    def counting(self, role, input_ids, attention_mask):
        scored_rows.append(input_ids.shape[0])
        return original(self, role, input_ids, attention_mask)

    monkeypatch.setattr(RoleModel, "reward_scores", counting)
    embedding = saved_rm._causal_lm.get_input_embeddings()
    hook = embedding.register_forward_hook(lambda module, inputs, output: embedded_rows.append(output.shape[0]))
    try:
        loss, accuracy, scores = ranking_batch_loss(saved_rm, batch, margin=0.0, center_coef=0.0)
    finally:
        hook.remove()
    answers, pairs = sum(sizes), sum(n * (n - 1) // 2 for n in sizes)
    assert scored_rows == [answers] and embedded_rows == [answers]
    assert answers < pairs  # K >= 4: the pairwise cost would show
    assert scores.shape == (answers,)

    groups = list(torch.split(scores.detach().double(), sizes))
    expected_loss, expected_accuracy = explicit_pairs_loss(groups)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert accuracy.item() == pytest.approx(expected_accuracy, abs=1e-6)

    monkeypatch.setattr(RoleModel, "reward_scores", original)
    with torch.no_grad():
        alone = torch.cat([saved_rm.reward_scores("reward", torch.tensor([ids]), torch.ones(1, len(ids)))
                           for example in examples for ids in example["input_ids"]])
    torch.testing.assert_close(scores.detach(), alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
# the shortcuts each command's help must list, and the config field each stands for
SHORTCUTS = {
    "sft": {"model": "model.path", "data": "data.path", "out": "out_dir"},
    "rm": {"model": "model.path", "data": "data.path", "out": "out_dir", "sft": "sft_dir",
           "demos": "data.demonstrations"},
    "ppo": {"model": "model.path", "data": "data.path", "out": "out_dir", "sft": "sft_dir", "rm": "rm_dir",
            "pretrain": "data.pretrain", "ptx_coef": "ptx_coef"},
    "pipeline": {"model": "model_path", "out": "out_dir", "data": "data.dir", "gold": "gold"},
    "eval": {"model": "model.path", "data": "data.path", "out": "out_dir", "sft": "sft_dir", "rm": "rm_dir",
             "policy": "policy_dir", "pretrain": "data.pretrain"},
    "toy": {"out": "out_dir"},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RLHF_KERNELS_BACKEND="torch", TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def rlhf_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf", *args], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def run_module_main(monkeypatch, argv: list[str]) -> int:
    """`python -m rlhf ARGV` in this process (the same __main__ module, without paying the imports again)."""
    monkeypatch.setattr(sys, "argv", ["rlhf", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("rlhf", run_name="__main__", alter_sys=True)
    return exit_info.value.code


def test_cli_help_lists_every_command():
    """`python -m rlhf --help` exits 0 and lists each command (cheap: `import rlhf` loads no torch)."""
    proc = rlhf_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in SHORTCUTS:
        assert re.search(rf"^  {command} +\S", proc.stdout, re.M), command


@pytest.mark.parametrize("command", list(SHORTCUTS))
def test_cli_command_help_lists_its_shortcuts_and_fields(command, monkeypatch, capsys):
    """`rlhf <command> --help` exits 0 and lists each shortcut with the config field it sets, a field
    that the same help lists among the command's config fields."""
    assert run_module_main(monkeypatch, [command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf {command} ")
    shortcuts = dict(re.findall(r"^  --(\S+) += --(\S+)$", out, re.M))
    assert shortcuts == SHORTCUTS[command]
    for dotted in shortcuts.values():
        assert re.search(rf"^  --{re.escape(dotted)} +\S", out, re.M), f"{command}: no field {dotted}"


def test_cli_sft_then_rm_on_the_quick_world(quick_toy_world, tmp_path):
    """`rlhf sft` then `rlhf rm --sft` as subprocesses: both exit 0 and leave their adapters and DONE."""
    world, sft, rm = quick_toy_world, tmp_path / "sft", tmp_path / "rm"
    common = ["--model.quantization", "none", "--device", "cpu", "--checkpoint_every", "1000"]
    proc = rlhf_cli("sft", "--model", str(world.model), "--data", str(world.sft), "--out", str(sft), *common,
                    "--epochs", "1", "--batch_size", "32", "--micro_batch_size", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = rlhf_cli("rm", "--model", str(world.model), "--data", str(world.rankings), "--out", str(rm),
                    "--sft", str(sft), "--demos", str(world.sft), *common, "--batch_size", "16",
                    "--micro_batch_size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run_dir, role in ((sft, "policy"), (rm, "reward")):
        assert (run_dir / "DONE").is_file()
        assert (run_dir / role / "adapter_config.json").is_file()
        assert (run_dir / role / "adapter_model.safetensors").is_file()
    assert (rm / "reward" / "head.safetensors").is_file()
    assert yaml.safe_load((rm / "config.yaml").read_text())["sft_dir"] == str(sft)
    assert yaml.safe_load((rm / "config.yaml").read_text())["data"]["demonstrations"] == str(world.sft)


def test_cli_bad_value_fails_in_one_line_naming_the_field(quick_toy_world, tmp_path):
    """A value of the wrong type: exit 2 before anything is written, and stderr is one line that names
    the field and the value (no traceback, no log noise)."""
    world, out = quick_toy_world, tmp_path / "sft"
    proc = rlhf_cli("sft", "--model", str(world.model), "--data", str(world.sft), "--out", str(out),
                    "--epochs", "notanumber")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["rlhf sft: error: epochs: expected an integer, got 'notanumber'"]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 4-bit base
# ------------------------------------------------------------------------------------------------
def test_sft_on_an_nf4_base_lowers_the_train_loss(quick_toy_world, tmp_path, monkeypatch):
    """SFT over the NF4-quantized base (QLoRA) trains: the last steps' loss is well below the first's."""
    built = []

    def capture(*args, **kwargs):
        built.append(RoleModel(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(rlhf.sft, "RoleModel", capture)
    cfg = sft_config(quick_toy_world, tmp_path / "sft", epochs=1, log_every=1, **{
        "model.quantization": "nf4", "optim.warmup_steps": 2})
    out = train_sft(cfg)
    assert any(type(p).__name__ == "Params4bit" for p in built[0]._causal_lm.parameters())
    losses = [r["train_loss"] for r in read_metrics(out) if "train_loss" in r]
    train_records, _ = val_split(quick_toy_world.sft, "sft")
    assert len(losses) == math.ceil(len(train_records) / 16)  # the train users' demonstrations / 16, a row per step
    print(f"nf4 SFT train loss: first step {losses[0]:.3f}, last three {sum(losses[-3:]) / 3:.3f}")
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2
    assert (out / "DONE").is_file() and (out / "policy" / "adapter_model.safetensors").is_file()

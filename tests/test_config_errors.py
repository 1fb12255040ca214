"""Bad configs fail before any model loads, through the CLI (exit code 2, one line on stderr) and the API.

Every case: unknown keys (with a did-you-mean), wrong types, impossible combinations, paths that do
not exist, a resume path that is not a checkpoint. A fixture makes loading a model fail the test.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import rlhf.eval
import rlhf.ppo.loop
import rlhf.reward
import rlhf.sft
from rlhf.cli import main
from rlhf.config import load_config
from rlhf.errors import ConfigError
from rlhf.models import ModelConfig
from rlhf.ppo import PPOConfig
from rlhf.ppo import train as train_ppo
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was raised")

    for module in (rlhf.sft, rlhf.reward, rlhf.ppo.loop, rlhf.eval):
        monkeypatch.setattr(module, "RoleModel", refuse)


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit with 2 and one `rlhf <cmd>: error:` line, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def world(tmp_path) -> SimpleNamespace:
    """Paths that exist (check_inputs only checks existence; the errors come before anything is read)."""
    root = tmp_path / "world"
    (root / "model").mkdir(parents=True)
    paths = {"model": root / "model"}
    for name in ("sft", "rankings", "prompts", "pretrain"):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("{}\n")
    return SimpleNamespace(**paths)


@pytest.fixture
def sft_run(tmp_path) -> Path:
    """A directory that looks like a finished SFT run (a policy adapter config is all check_inputs reads)."""
    (tmp_path / "sft" / "policy").mkdir(parents=True)
    (tmp_path / "sft" / "policy" / "adapter_config.json").write_text("{}")
    return tmp_path / "sft"


# --- unknown keys, with a did-you-mean -----------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["sft", "--epoch", "3"], "unknown config key 'epoch'; did you mean 'epochs'?"),
    (["sft", "--optim.lrr", "0.1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["ppo", "--rollout.batchsize", "8"], "unknown config key 'rollout.batchsize'; did you mean 'rollout.batch_size'?"),
    (["ppo", "--kl.coeff", "0.1"], "unknown config key 'kl.coeff'; did you mean 'kl.coef'?"),
    (["rm", "--model.lora_rank", "8"], "unknown config key 'model.lora_rank'; did you mean 'model.lora_r'?"),
    (["pipeline", "--sft.epochz", "1"], "unknown config key 'sft.epochz'; did you mean 'sft.epochs'?"),
    (["pipeline", "--ppo.kl.coeff", "1"], "unknown config key 'ppo.kl.coeff'; did you mean 'ppo.kl.coef'?"),
    (["sft", "--zzz", "1"], "unknown config key 'zzz'; known keys: "),
    (["sft", "--optim.zz", "1"], "unknown config key 'optim.zz'; known keys in optim: adam_eps, lr, "),
    # a field's name without its group, or a mistyped group
    (["sft", "--lr", "0.1"], "unknown config key 'lr'; did you mean 'optim.lr'?"),
    (["ppo", "--lora_r", "8"], "unknown config key 'lora_r'; did you mean 'model.lora_r'?"),
    (["sft", "--optimizer.lr", "0.1"], "unknown config key 'optimizer.lr'; did you mean 'optim.lr'?"),
    (["ppo", "--rollout.coef", "0.1"], "unknown config key 'rollout.coef'; did you mean 'kl.coef'?"),
])
def test_unknown_keys_suggest_the_close_one(capsys, argv, message):
    assert message in cli_error(capsys, argv)


def test_unknown_key_in_a_yaml_file(capsys, tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("iterations: 3\nkl:\n  coef: 0.1\n  horizn: 100\n")
    err = cli_error(capsys, ["ppo", "--config", str(path)])
    assert "unknown config key 'kl.horizn'; did you mean 'kl.horizon'?" in err
    with pytest.raises(ConfigError, match=r"unknown config key 'kl\.horizn'; did you mean 'kl\.horizon'\?"):
        load_config(PPOConfig, path)


# --- names users bring from TRL / Hugging Face TrainingArguments ---------------------------------
@pytest.mark.parametrize("argv, message", [
    (["sft", "--learning_rate", "1e-4"], "unknown config key 'learning_rate': TRL / Hugging Face's "
                                         "'learning_rate' is 'optim.lr' here"),
    (["sft", "--max_steps", "10"], "'max_steps' is 'epochs' here (runs are counted in epochs"),
    (["ppo", "--max_steps", "10"], "'max_steps' is 'iterations' here"),
    (["sft", "--num_train_epochs", "2"], "'num_train_epochs' is 'epochs' here"),
    (["sft", "--per_device_train_batch_size", "4"], "'per_device_train_batch_size' is 'micro_batch_size' here"),
    (["rm", "--gradient_accumulation_steps", "4"], "'gradient_accumulation_steps' is 'batch_size' here "
                                                   "(accumulation = batch_size / micro_batch_size)"),
    (["sft", "--output_dir", "x"], "'output_dir' is 'out_dir' here (or --out)"),
    (["sft", "--model_name_or_path", "x"], "'model_name_or_path' is 'model.path' here"),
    (["pipeline", "--model_name_or_path", "x"], "'model_name_or_path' is 'model_path' here"),
    (["ppo", "--cliprange", "0.1"], "'cliprange' is 'clip_eps' here"),
    (["ppo", "--kl_coef", "0.1"], "'kl_coef' is 'kl.coef' here"),
    (["sft", "--report_to", "wandb"], "unknown config key 'report_to': not supported here: metrics go to "
                                      "<out>/metrics.jsonl"),
])
def test_names_from_trl_and_hf_get_a_hint(capsys, argv, message):
    assert message in cli_error(capsys, argv)


def test_seed_is_the_same_name_here():
    assert load_config(SFTConfig, overrides={"seed": "3"}).seed == 3


# --- wrong types ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["sft", "--epochs", "three"], "epochs: expected an integer, got 'three'"),
    (["sft", "--epochs", "2.5"], "epochs: expected an integer, got 2.5"),
    (["sft", "--optim.lr", "fast"], "optim.lr: expected a number, got 'fast'"),
    (["ppo", "--auto_halve_micro_batch", "maybe"], "auto_halve_micro_batch: expected true or false, got 'maybe'"),
    (["sft", "--model.quantization", "int8"], "model.quantization: must be one of 'nf4', 'none'; got 'int8'"),
    (["eval", "--gold", "gpt4"], "gold: must be one of 'toy', 'instructions', 'none'; got 'gpt4'"),
    (["sft", "--precision", "bf8"], "precision: must be one of 'auto', 'bf16', 'fp16', 'fp32'; got 'bf8'"),
    (["ppo", "--kl.estimator", "k4"], "kl.estimator: must be one of 'k1', 'k2', 'k3'; got 'k4'"),
    (["pipeline", "--rm_labels", "human"], "rm_labels: must be one of 'sampled', 'file'; got 'human'"),
    (["pipeline", "--ppo_variants", "[ppo, dpo]"], "ppo_variants[1]: must be one of 'ppo', 'ppo_ptx'; got 'dpo'"),
    (["ppo", "--rollout", "3"], "rollout: expected a mapping of RolloutConfig fields, got 3"),
    (["ppo", "--kl.coef.value", "3"], "kl.coef: expected a number, got {'value': 3}"),
])
def test_wrong_types_name_the_field(capsys, argv, message):
    assert message in cli_error(capsys, argv)


def test_wrong_type_in_a_yaml_file(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"batch_size: expected an integer, got \[1, 2\]"):
        load_config(SFTConfig, path)


# --- impossible combinations ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["sft", "--batch_size", "10", "--micro_batch_size", "4"],
     "batch_size=10 must be a positive multiple of micro_batch_size=4"),
    (["ppo", "--rollout.batch_size", "12", "--mini_batch_size", "8"],
     "rollout.batch_size=12 must be a multiple of mini_batch_size=8"),
    (["ppo", "--mini_batch_size", "8", "--micro_batch_size", "3", "--rollout.batch_size", "16"],
     "mini_batch_size=8 must be a multiple of micro_batch_size=3"),
    (["ppo", "--ptx_coef", "-1"], "ptx_coef must be >= 0, got -1.0"),
    (["ppo", "--rollout.top_p", "0"], "rollout.top_p must be in (0, 1], got 0.0"),
    (["pipeline", "--ptx_coef", "0"], "ppo_variants has 'ppo_ptx' but ptx_coef=0.0; set ptx_coef > 0"),
    (["pipeline", "--model", "/some/model"], "with model_path set, give data.sft, data.prompts and data.pretrain too"),
    (["pipeline", "--data.sft", "demos.jsonl"], "data.* is set but model_path is not: the toy world brings its own"),
])
def test_impossible_combinations(capsys, argv, message):
    assert message in cli_error(capsys, argv)


def test_ppo_without_a_reward_model(capsys, sft_run):
    assert "rm_dir: PPO needs a reward model (--rm RUN_DIR)" in cli_error(capsys, ["ppo", "--sft", str(sft_run)])
    with pytest.raises(ConfigError, match=r"sft_dir: PPO needs the SFT run directory \(--sft RUN_DIR\)"):
        train_ppo(PPOConfig(rm_dir=str(sft_run)))


def test_ptx_coef_without_a_pretraining_set(capsys, sft_run):
    err = cli_error(capsys, ["ppo", "--sft", str(sft_run), "--rm", str(sft_run), "--ptx_coef", "27.8"])
    assert "ptx_coef=27.8 needs data.pretrain (--pretrain pretrain.jsonl)" in err
    with pytest.raises(ConfigError, match=r"ptx_coef=0\.5 needs data\.pretrain"):
        train_ppo(PPOConfig(sft_dir=str(sft_run), rm_dir=str(sft_run), ptx_coef=0.5))


# --- paths that do not exist ---------------------------------------------------------------------
def test_missing_paths(capsys, tmp_path, world):
    nope = tmp_path / "nope"
    assert f"config file '{nope}.yaml' does not exist" in cli_error(capsys, ["sft", "--config", f"{nope}.yaml"])
    assert f"model.path (--model): model '{nope}' does not exist" in cli_error(
        capsys, ["sft", "--model", str(nope), "--data", str(world.sft)])
    assert "model.path: a model is required (--model DIR, FILE.gguf or a Hub id)" in cli_error(
        capsys, ["sft", "--data", str(world.sft)])
    assert f"data.path (--data): demonstrations file '{nope}.jsonl' does not exist" in cli_error(
        capsys, ["sft", "--model", str(world.model), "--data", f"{nope}.jsonl"])
    assert f"data.demonstrations (--demos): demonstrations file '{nope}' does not exist" in cli_error(
        capsys, ["rm", "--model", str(world.model), "--data", str(world.rankings), "--demos", str(nope)])
    assert f"'{nope}' has no 'policy' adapter" in cli_error(
        capsys, ["rm", "--model", str(world.model), "--data", str(world.rankings), "--sft", str(nope)])
    assert f"data.pretrain (--pretrain): pretraining file '{nope}' does not exist" in cli_error(
        capsys, ["eval", "--model", str(world.model), "--data", str(world.prompts), "--sft", str(nope),
                 "--rm", str(nope), "--pretrain", str(nope)])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"data\.path: a demonstrations file is required \(--data sft\.jsonl\)"):
        train_sft(SFTConfig(model=ModelConfig(path=str(world.model)), out_dir=str(out)))
    assert not out.exists()  # checked before the run directory is made


def test_resume_path_that_is_not_a_checkpoint(capsys, tmp_path, world):
    argv = ["sft", "--model", str(world.model), "--data", str(world.sft), "--out", str(tmp_path / "run"),
            "--resume", str(tmp_path)]
    message = f"resume: '{tmp_path}' is not a complete checkpoint directory (no COMPLETE marker)"
    assert message in cli_error(capsys, argv)


def test_bad_yaml_files(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    assert f"{broken}: not valid YAML" in cli_error(capsys, ["sft", "--config", str(broken)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n- 3\n")
    err = cli_error(capsys, ["sft", "--config", str(listed)])
    assert "the top level must be a mapping of config fields, got list" in err


def test_cli_usage_errors(capsys):
    assert "rlhf: unknown command 'sfft'" in cli_error(capsys, ["sfft"])
    assert "unexpected argument 'epochs': options look like --field value" in cli_error(capsys, ["sft", "epochs"])


def test_pipeline_data_dir_fills_the_files_it_holds(capsys, tmp_path):
    from rlhf.pipeline import PipelineConfig

    for name in ("sft", "prompts", "pretrain"):
        (tmp_path / f"{name}.jsonl").write_text("")
    cfg = load_config(PipelineConfig, overrides={"model_path": "/m", "data.dir": str(tmp_path),
                                                 "data.prompts": "/elsewhere/prompts.jsonl", "rm_labels": "file"})
    assert cfg.data.sft == str(tmp_path / "sft.jsonl") and cfg.data.pretrain == str(tmp_path / "pretrain.jsonl")
    assert cfg.data.prompts == "/elsewhere/prompts.jsonl"  # a file named on its own wins over the directory's
    assert cfg.data.rankings == ""  # not in the directory
    assert f"data.dir (--data): data directory '{tmp_path / 'nope'}' does not exist" in cli_error(
        capsys, ["pipeline", "--model", "/m", "--data", str(tmp_path / "nope")])


@pytest.mark.parametrize("command", ["toy", "pipeline"])
def test_toy_world_errors_name_the_flag_the_command_takes(capsys, command):
    # `rlhf toy` and `rlhf pipeline` both nest the world's config under `toy`, so the error's field is the flag
    err = cli_error(capsys, [command, "--toy.warmup_steps", "5000", "--toy.pretrain_steps", "800"])
    assert "toy.warmup_steps=5000: must be in [0, toy.pretrain_steps=800" in err

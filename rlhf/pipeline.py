"""The whole recipe from one config: SFT -> labelling -> RM -> PPO (and PPO-ptx) -> evaluation.

With no arguments it runs the toy world (written first into `<out>/toy` if missing). Every stage
writes its own run directory under `<out>` and a `DONE` marker when it finishes; a rerun skips the
finished stages and resumes an unfinished one from its newest checkpoint.

    <out>/toy/                 the toy world (data + pretrained base + split.json), when no data was given
    <out>/split.json           the train / tune / test users every stage reads (your data, no split given)
    <out>/sft/                 policy adapter (later the frozen reference)
    <out>/rm_rankings.jsonl    K SFT samples per RM prompt, ranked by the labeller
    <out>/rm/                  reward adapter + head
    <out>/ppo/, <out>/ppo_ptx/ policy and value adapters
    <out>/eval.json            the evaluation table (test users), with gold_vs_kl.png beside it
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import require_path, save_config, validate
from rlhf.data import SPLIT_FILE, UserSplit, load_records
from rlhf.errors import ConfigError
from rlhf.eval import EvalConfig, evaluate
from rlhf.models import ModelConfig
from rlhf.ppo import PPOConfig
from rlhf.ppo import train as train_ppo
from rlhf.reward import RMConfig
from rlhf.reward import train as train_rm
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft
from rlhf.stage_dirs import is_done
from rlhf.training import resolve_device
from rlhf.toy import ToyConfig, gold_score, write_toy_world

log = logging.getLogger("rlhf.pipeline")

PPO_VARIANTS = ("ppo", "ppo_ptx")


@dataclass
class PipelineData:
    dir: str = ""  # a directory laid out like the toy world's; fills the files below that are not set
    sft: str = ""  # demonstrations; "" = the toy world's (as are the three below)
    rankings: str = ""  # used when rm_labels = "file"
    prompts: str = ""  # RM prompts come from `rankings`' prompts; RL and eval prompts from here
    pretrain: str = ""  # plain text for PPO-ptx and the pretrain-loss column

    def validate(self) -> None:
        if not self.dir:
            return
        folder = require_path(self.dir, "data.dir", "data directory")
        for name in DATA_FILES:
            if not getattr(self, name) and (folder / f"{name}.jsonl").is_file():
                setattr(self, name, str(folder / f"{name}.jsonl"))


DATA_FILES = ("sft", "rankings", "prompts", "pretrain")  # <name>.jsonl in data.dir, as the toy world writes them


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    model_path: str = ""  # a local HF model dir; "" = the toy world's pretrained base
    quantization: str = "nf4"  # design card: one shared 4-bit base under every role
    data: PipelineData = field(default_factory=PipelineData)
    toy: ToyConfig = field(default_factory=ToyConfig)
    rm_labels: str = "sampled"  # InstructGPT: RM data are K SFT samples ranked by labellers ("file": data.rankings)
    rm_k: int = 6  # InstructGPT: K = 4..9 answers ranked per prompt; ours: 6, as tied answers are dropped
    split: str = ""  # a split.json of train / tune / test users; "" = the toy world's, or (your data)
    # `<out>/split.json` written once from the users of data.sft, data.rankings and data.prompts
    split_seed: int = 0  # ours: the seed of a split written for your data
    tune_fraction: float = 0.1  # ours: users for choices (learning rate, ptx_coef)
    test_fraction: float = 0.1  # ours: users for the reported evaluation only
    ppo_variants: list[str] = field(default_factory=lambda: list(PPO_VARIANTS))
    ptx_coef: float = 1.0  # used by the "ppo_ptx" variant ("ppo" has 0). InstructGPT's gamma is 27.8;
    # ours: on the toy world 27.8 drowns the RL signal (gold score 0.65 against SFT's 0.78), 1.0 keeps
    # PPO's gold gain while the pretraining loss falls instead of rising
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"

    def validate(self) -> None:
        if self.rm_labels not in ("sampled", "file"):
            raise ConfigError(f"rm_labels must be 'sampled' or 'file', got {self.rm_labels!r}")
        if self.rm_k < 2:
            raise ConfigError(f"rm_k must be >= 2 (a ranking needs two answers), got {self.rm_k}")
        unknown = [v for v in self.ppo_variants if v not in PPO_VARIANTS]
        if unknown or not self.ppo_variants:
            raise ConfigError(f"ppo_variants must be a non-empty subset of {list(PPO_VARIANTS)}, got {self.ppo_variants}")
        if "ppo_ptx" in self.ppo_variants and self.ptx_coef <= 0:
            raise ConfigError(f"ppo_variants has 'ppo_ptx' but ptx_coef={self.ptx_coef}; set ptx_coef > 0")
        if not (0 <= self.tune_fraction < 1 and 0 <= self.test_fraction < 1 and self.tune_fraction + self.test_fraction < 1):
            raise ConfigError(f"tune_fraction={self.tune_fraction} and test_fraction={self.test_fraction} must be in "
                              "[0, 1) and leave room for train users")
        if self.quantization not in ("nf4", "none"):
            raise ConfigError(f"quantization must be 'nf4' or 'none', got {self.quantization!r}")
        if self.uses_toy() and any(dataclasses.astuple(self.data)):
            raise ConfigError("data.* is set but model_path is not: the toy world brings its own data and model; "
                              "give --model PATH to train on your data")
        if not self.uses_toy() and not all((self.data.sft, self.data.prompts, self.data.pretrain)):
            raise ConfigError("with model_path set, give data.sft, data.prompts and data.pretrain too, or "
                              f"--data DIR holding {', '.join(f + '.jsonl' for f in DATA_FILES)} "
                              "(or none of them, to run the toy world)")
        if not self.uses_toy() and self.rm_labels == "sampled":
            raise ConfigError("rm_labels='sampled' needs a labeller; only the toy world has one. "
                              "Use rm_labels=file with data.rankings")

    def uses_toy(self) -> bool:
        return not self.model_path


def _model(cfg: PipelineConfig, stage_model: ModelConfig, path: Path) -> ModelConfig:
    return dataclasses.replace(stage_model, path=str(path), quantization=cfg.quantization)


def _split_file(cfg: PipelineConfig, out: Path, toy_split: Path | None, data_files: dict[str, Path]) -> Path:
    """The one split.json every stage reads: given, the toy world's, or written once for your data."""
    if cfg.split:
        return require_path(cfg.split, "split", "split file (split.json)")
    if toy_split is not None:
        return toy_split
    path = out / SPLIT_FILE
    if not path.is_file():  # written once: a rerun must not move users between parts
        users = {r.get("user_id") for kind, f in data_files.items() if f.is_file()
                 for r in load_records(f, kind, skip_invalid=True)}
        UserSplit.for_users(users, cfg.split_seed, cfg.tune_fraction, cfg.test_fraction).write(path)
        log.info("wrote the user split to %s", path)
    return path


def run(cfg: PipelineConfig) -> dict:
    """Run (or finish) every stage and return the evaluation result."""
    validate(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline_config.yaml")
    device = str(resolve_device(cfg.device))
    if cfg.uses_toy():
        world = write_toy_world(out / "toy", cfg.toy)  # returns at once when already complete
        model_path, sft_data, rankings, prompts, pretrain = (world.model, world.sft, world.rankings,
                                                             world.prompts, world.pretrain)
    else:
        model_path, sft_data, prompts, pretrain = (Path(cfg.model_path), Path(cfg.data.sft),
                                                   Path(cfg.data.prompts), Path(cfg.data.pretrain))
        rankings = Path(cfg.data.rankings)
    split = _split_file(cfg, out, world.split if cfg.uses_toy() else None,
                        {"sft": sft_data, "rankings": rankings, "prompts": prompts})

    sft_dir = out / "sft"
    if not is_done(sft_dir):
        train_sft(dataclasses.replace(
            cfg.sft, model=_model(cfg, cfg.sft.model, model_path), out_dir=str(sft_dir), resume="auto",
            device=device, data=dataclasses.replace(cfg.sft.data, path=str(sft_data), split=str(split))))

    rm_data = rankings
    if cfg.rm_labels == "sampled":
        rm_data = out / "rm_rankings.jsonl"
        if not rm_data.exists():
            from rlhf.labelling import sample_rankings

            sample_rankings(_model(cfg, cfg.rm.model, model_path), sft_dir, rankings, rm_data, gold_score, k=cfg.rm_k,
                            max_new_tokens=cfg.ppo.rollout.max_new_tokens, seed=cfg.rm.seed,
                            max_prompt_length=cfg.ppo.data.max_prompt_length, device=device)
    rm_dir = out / "rm"
    if not is_done(rm_dir):
        train_rm(dataclasses.replace(
            cfg.rm, model=_model(cfg, cfg.rm.model, model_path), out_dir=str(rm_dir), sft_dir=str(sft_dir),
            resume="auto", device=device,
            data=dataclasses.replace(cfg.rm.data, path=str(rm_data), demonstrations=str(sft_data), split=str(split))))

    for variant in cfg.ppo_variants:
        run_dir = out / variant
        if is_done(run_dir):
            continue
        ptx_coef = cfg.ptx_coef if variant == "ppo_ptx" else 0.0
        train_ppo(dataclasses.replace(
            cfg.ppo, model=_model(cfg, cfg.ppo.model, model_path), out_dir=str(run_dir), sft_dir=str(sft_dir),
            rm_dir=str(rm_dir), ptx_coef=ptx_coef, resume="auto", device=device,
            data=dataclasses.replace(cfg.ppo.data, path=str(prompts), pretrain=str(pretrain), split=str(split))))

    return evaluate(dataclasses.replace(
        cfg.eval, model=_model(cfg, cfg.eval.model, model_path), out_dir=str(out), sft_dir=str(sft_dir),
        rm_dir=str(rm_dir), policies={v: str(out / v) for v in cfg.ppo_variants},
        gold="toy" if cfg.uses_toy() else cfg.eval.gold, device=device,
        max_new_tokens=cfg.ppo.rollout.max_new_tokens,
        data=dataclasses.replace(cfg.eval.data, path=str(prompts), pretrain=str(pretrain), split=str(split))))

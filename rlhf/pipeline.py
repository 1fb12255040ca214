"""The whole recipe from one config: SFT -> labelling -> RM -> PPO (and PPO-ptx) -> evaluation.

With no arguments it runs the toy world (written first into `<out>/toy` if missing). Every stage
writes its own run directory under `<out>` and a `DONE` marker when it finishes; a rerun skips the
finished stages and resumes an unfinished one from its newest checkpoint.

    <out>/toy/                 the toy world (data + pretrained base), when no data was given
    <out>/sft/                 policy adapter (later the frozen reference)
    <out>/rm_rankings.jsonl    K SFT samples per RM prompt, ranked by the labeller
    <out>/rm/                  reward adapter + head
    <out>/ppo/, <out>/ppo_ptx/ policy and value adapters
    <out>/eval.json            the evaluation table
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import ChatTemplateSetting, require_path, save_config, validate
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
from rlhf.toy import ToyConfig, rank, write_toy_world

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
    model_path: str = ""  # a local HF model dir, a .gguf file or a Hub id; "" = the toy world's pretrained base
    quantization: str = "nf4"  # design card: one shared 4-bit base under every role
    # one chat-template switch for every stage and the labelling (see rlhf.data.tokenize)
    use_chat_template: ChatTemplateSetting = "auto"
    data: PipelineData = field(default_factory=PipelineData)
    toy: ToyConfig = field(default_factory=ToyConfig)
    rm_labels: str = "sampled"  # InstructGPT: RM data are K SFT samples ranked by labellers ("file": data.rankings)
    rm_k: int = 4  # InstructGPT: K = 4..9 answers ranked per prompt
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

    sft_dir = out / "sft"
    if not is_done(sft_dir):
        train_sft(dataclasses.replace(
            cfg.sft, model=_model(cfg, cfg.sft.model, model_path), out_dir=str(sft_dir), resume="auto",
            device=device, data=dataclasses.replace(cfg.sft.data, path=str(sft_data),
                                                    use_chat_template=cfg.use_chat_template)))

    rm_data = rankings
    if cfg.rm_labels == "sampled":
        rm_data = out / "rm_rankings.jsonl"
        if not rm_data.exists():
            from rlhf.labelling import sample_rankings

            sample_rankings(_model(cfg, cfg.rm.model, model_path), sft_dir, rankings, rm_data, rank, k=cfg.rm_k,
                            max_new_tokens=cfg.ppo.rollout.max_new_tokens, seed=cfg.rm.seed,
                            max_prompt_length=cfg.ppo.data.max_prompt_length, device=device,
                            use_chat_template=cfg.use_chat_template)
    rm_dir = out / "rm"
    if not is_done(rm_dir):
        train_rm(dataclasses.replace(
            cfg.rm, model=_model(cfg, cfg.rm.model, model_path), out_dir=str(rm_dir), sft_dir=str(sft_dir),
            resume="auto", device=device,
            data=dataclasses.replace(cfg.rm.data, path=str(rm_data), demonstrations=str(sft_data),
                                     use_chat_template=cfg.use_chat_template)))

    for variant in cfg.ppo_variants:
        run_dir = out / variant
        if is_done(run_dir):
            continue
        ptx_coef = cfg.ptx_coef if variant == "ppo_ptx" else 0.0
        train_ppo(dataclasses.replace(
            cfg.ppo, model=_model(cfg, cfg.ppo.model, model_path), out_dir=str(run_dir), sft_dir=str(sft_dir),
            rm_dir=str(rm_dir), ptx_coef=ptx_coef, resume="auto", device=device,
            data=dataclasses.replace(cfg.ppo.data, path=str(prompts), pretrain=str(pretrain),
                                     use_chat_template=cfg.use_chat_template)))

    return evaluate(dataclasses.replace(
        cfg.eval, model=_model(cfg, cfg.eval.model, model_path), out_dir=str(out), sft_dir=str(sft_dir),
        rm_dir=str(rm_dir), policies={v: str(out / v) for v in cfg.ppo_variants},
        gold="toy" if cfg.uses_toy() else cfg.eval.gold, device=device,
        max_new_tokens=cfg.ppo.rollout.max_new_tokens,
        data=dataclasses.replace(cfg.eval.data, path=str(prompts), pretrain=str(pretrain),
                                 val_fraction=cfg.ppo.data.val_fraction, seed=cfg.ppo.data.seed,
                                 use_chat_template=cfg.use_chat_template)))

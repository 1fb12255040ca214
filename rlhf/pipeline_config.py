"""`PipelineConfig`: the whole recipe's settings (see `rlhf/pipeline.py`). Torch-free, so
`rlhf pipeline --help` is fast."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.config import ChatTemplateSetting, require_path
from rlhf.errors import ConfigError
from rlhf.eval_config import EvalConfig
from rlhf.judges import GOLD_JUDGES
from rlhf.ppo.config import PPOConfig
from rlhf.reward_config import RMConfig
from rlhf.sft_config import SFTConfig
from rlhf.toy.config import ToyConfig

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
        folder = require_path(self.dir, "data.dir", "data directory", "--data DIR")
        for name in DATA_FILES:
            if not getattr(self, name) and (folder / f"{name}.jsonl").is_file():
                setattr(self, name, str(folder / f"{name}.jsonl"))


DATA_FILES = ("sft", "rankings", "prompts", "pretrain")  # <name>.jsonl in data.dir, as the toy world writes them
TASK_MANIFEST = "task.json"  # in data.dir: {"gold": judge name, ...}, written by `rlhf instructions`


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"  # one run directory per stage under it (sft/, rm/, ppo/, ppo_ptx/), eval.json
    model_path: str = ""  # a local HF model dir, a .gguf file or a Hub id; "" = the toy world's pretrained base
    quantization: Literal["nf4", "none"] = "nf4"  # design card: one shared 4-bit base under every role
    use_chat_template: ChatTemplateSetting = "auto"  # ours: one chat-template switch for every stage and the
    # labelling (rlhf.data.tokenize): "auto" uses the tokenizer's template whenever it has one
    data: PipelineData = field(default_factory=PipelineData)
    toy: ToyConfig = field(default_factory=ToyConfig)
    rm_labels: Literal["sampled", "file"] = "sampled"  # InstructGPT: RM data are K SFT samples ranked by labellers ("file": data.rankings)
    rm_k: int = 6  # InstructGPT: K = 4..9 answers ranked per prompt; ours: 6, as tied answers are dropped
    split: str = ""  # a split.json of train / tune / test users; "" = the toy world's, else the run's own
    # `<out>/split.json`, else data.dir's split.json, else one written once to `<out>/split.json` from your data
    split_seed: int = 0  # ours: the seed of a split written for your data
    tune_fraction: float = 0.1  # ours: users for choices (learning rate, ptx_coef)
    test_fraction: float = 0.1  # ours: users for the reported evaluation only
    ppo_variants: list[Literal["ppo", "ppo_ptx"]] = field(default_factory=lambda: list(PPO_VARIANTS))
    # InstructGPT compares both: PPO, and PPO-ptx with ptx_coef times the pretraining log-likelihood
    ptx_coef: float = 1.0  # used by the "ppo_ptx" variant ("ppo" has 0). InstructGPT's gamma is 27.8;
    # ours: on the earlier toy world (conciseness-rewarding judge) 27.8 drowned the RL signal (gold 0.65
    # against SFT's 0.78) and 1.0 kept PPO's gain; not retuned for the current judge (README, toy results)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # "auto": cuda when available, else cpu; passed to every stage
    gold: str = ""  # the gold judge (rlhf.judges) that ranks the RM's samples and scores eval: "" = the toy
    # world's for the toy world, else the one data.dir's task.json names (rlhf instructions writes one)

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
        if self.gold and self.gold not in GOLD_JUDGES:
            raise ConfigError(f"gold must be one of {list(GOLD_JUDGES)} (or '' for the data's own), "
                              f"got {self.gold!r}")
        if self.rm_labels == "sampled" and self.gold_judge() == "none":
            raise ConfigError("rm_labels='sampled' needs a gold judge to rank the samples: --gold NAME "
                              f"({', '.join(GOLD_JUDGES)}), or a --data DIR whose task.json names one; "
                              "or use rm_labels=file with data.rankings")

    def uses_toy(self) -> bool:
        return not self.model_path

    def gold_judge(self) -> str:
        """The judge that labels and evaluates: `gold`, else the toy world's, else the one named in data.dir's
        task.json, else eval.gold ("none" when there is none)."""
        if self.gold:
            return self.gold
        if self.uses_toy():
            return "toy"
        manifest = Path(self.data.dir) / TASK_MANIFEST if self.data.dir else None
        if manifest is not None and manifest.is_file():
            return json.loads(manifest.read_text(encoding="utf-8")).get("gold", "none")
        return self.eval.gold

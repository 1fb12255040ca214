"""`EvalConfig`: what `rlhf eval` compares and how (see `rlhf/eval.py`). Torch-free, so
`rlhf eval --help` is fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ChatTemplateSetting
from rlhf.errors import ConfigError
from rlhf.judges import GOLD_JUDGES
from rlhf.models.config import ModelConfig
from rlhf.ppo.config import check_prompt_run_inputs
from rlhf.stage_dirs import adapter_dir


@dataclass
class EvalData:
    path: str = ""  # prompts; those of the `part` users are evaluated
    pretrain: str = ""  # {"text"} records; "" skips pretrain_loss
    split: str = ""  # split.json: the train / tune / test users every stage shares (evaluation reads `part`);
    # "" = the split.json beside data.path (the toy world and `rlhf pipeline` write one), else hashed users
    part: Literal["train", "tune", "test"] = "test"  # "test" for reported figures; "tune" while choosing settings
    max_prompts: int = 200  # ours: enough prompts for a win rate within a few points
    max_prompt_length: int = 48  # as PPO's data.max_prompt_length: longer prompts keep their end
    max_pretrain_length: int = 64  # as PPO's data.max_pretrain_length: tokens per pretraining chunk
    max_pretrain_chunks: int = 256  # ours: held-out pretraining chunks scored per policy
    use_chat_template: ChatTemplateSetting = "auto"  # ours: the model's own chat format whenever it has one; one
    # value for every stage, so the policy is trained and scored on the text it sees at rollout time
    skip_invalid: bool = False  # ours: fail on bad records unless asked to skip and count them


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalData = field(default_factory=EvalData)
    sft_dir: str = ""  # the SFT run: its policy adapter is the baseline and the KL reference
    rm_dir: str = ""  # the RM run: scores the answers
    policy_dir: str = ""  # one policy run to compare with SFT ("" = SFT alone)
    policies: dict[str, str] = field(default_factory=dict)  # more policies: {name: run dir}
    out_dir: str = "runs/eval"  # eval.json is written here
    gold: Literal["toy", "instructions", "none"] = "none"  # a gold judge of rlhf.judges ("toy": the toy world's,
    # "instructions": the instruction task's) scores answers; "none": no gold column
    max_new_tokens: int = 16  # longest sampled answer; the pipeline passes PPO's rollout.max_new_tokens
    temperature: float = 1.0  # sampling temperature for every policy (1.0: the policies themselves)
    answers_per_prompt: int = 4  # ours: samples per held-out prompt, averaged (less sampling noise)
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # best-of-n by the RM over SFT samples
    # (Stiennon et al. 2020): max(best_of_n) SFT samples per prompt are drawn once, each n takes a prefix
    temperatures: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # SFT sampled colder: the
    # baseline that needs no RM at all
    bootstrap_resamples: int = 2000  # ours: 95% intervals over prompts, seeded by `seed`
    batch_size: int = 64  # ours: prompts per sampling forward and chunks per pretrain-loss forward
    seed: int = 1234  # ours: the same sampling noise for every policy
    device: str = "auto"  # "auto": cuda when available, else cpu; or "cpu", "cuda", "cuda:1"

    def validate(self) -> None:
        if self.gold != "none" and self.gold not in GOLD_JUDGES:
            raise ConfigError(f"gold must be one of {[*GOLD_JUDGES, 'none']}, got {self.gold!r}")
        if self.answers_per_prompt < 1:
            raise ConfigError(f"answers_per_prompt must be >= 1, got {self.answers_per_prompt}")
        if any(n < 1 for n in self.best_of_n):
            raise ConfigError(f"best_of_n must hold n >= 1, got {self.best_of_n}")
        if any(not t > 0 for t in self.temperatures):
            raise ConfigError(f"temperatures must all be > 0, got {self.temperatures}")
        if self.bootstrap_resamples < 100:
            raise ConfigError(f"bootstrap_resamples must be >= 100 for a 95% interval, got {self.bootstrap_resamples}")

    def check_inputs(self) -> None:
        """The runs and files evaluation reads exist (before any model loads)."""
        if not self.sft_dir or not self.rm_dir:
            raise ConfigError("eval needs --sft RUN_DIR (baseline and KL reference) and --rm RUN_DIR (scores)")
        check_prompt_run_inputs(self.model.path, self.data.path, self.data.pretrain, self.sft_dir, self.rm_dir)
        for name, run in self.all_policies().items():
            if name != "sft":
                adapter_dir(run, "policy")

    def all_policies(self) -> dict[str, str]:
        runs = {"sft": self.sft_dir}
        if self.policy_dir:
            runs["policy"] = self.policy_dir
        runs.update(self.policies)
        return runs

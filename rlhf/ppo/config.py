"""PPOConfig: stage 3 of the recipe. Defaults run the toy world; each says where it comes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ChatTemplateSetting, require_model_source, require_path
from rlhf.errors import ConfigError
from rlhf.models.config import ModelConfig
from rlhf.stage_dirs import adapter_dir
from rlhf.optim_config import OptimConfig


@dataclass
class PPOData:
    path: str = ""  # RL prompts, {"prompt"} records (InstructGPT: ~31k prompts, no labels)
    pretrain: str = ""  # {"text"} records for PPO-ptx; needed when ptx_coef > 0
    split: str = ""  # split.json: the train / tune / test users every stage shares (PPO and ptx train on train);
    # "" = the split.json beside data.path (the toy world and `rlhf pipeline` write one), else hashed users
    max_prompt_length: int = 48  # ours: toy prompts are < 20 tokens; longer prompts keep their end
    max_pretrain_length: int = 64  # ours: toy pretraining texts are short
    use_chat_template: ChatTemplateSetting = "auto"  # ours: the model's own chat format whenever it has one; one
    # value for every stage, so the policy is trained and scored on the text it sees at rollout time
    skip_invalid: bool = False  # ours: fail loudly on bad records unless asked to skip and count

    def validate(self) -> None:
        if self.max_prompt_length < 1:
            raise ConfigError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")


@dataclass
class RolloutConfig:
    batch_size: int = 32  # ours: prompts per PPO iteration (one answer each)
    max_new_tokens: int = 16  # ours: toy answers are a few tokens; cut-off answers get no_eos_score
    temperature: float = 1.0  # ours: sample from the policy itself; scoring uses the same temperature
    top_p: float = 1.0  # 1.0: top-p < 1 samples from a distribution the log-probs do not describe
    no_eos_score: float | None = -1.0  # ours (TRL's missing_eos_penalty idea): a fixed low score for
    # answers that never stop; None keeps the RM score
    score_clip: float | None = None  # ours: optional bound on RM scores
    whiten_rewards: bool = False  # lm-human-preferences option; off as in InstructGPT

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("rollout.batch_size and rollout.max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class KLConfig:
    coef: float = 0.02  # InstructGPT appendix C.4: KL reward coefficient beta = 0.02
    estimator: Literal["k1", "k2", "k3"] = "k1"
    # Schulman, "Approximating KL Divergence": k1 = logp - ref_logp, unbiased
    target: float | None = None  # Ziegler et al. 2019 adaptive controller; None = fixed beta (InstructGPT)
    horizon: int = 10000  # Ziegler et al. 2019: horizon of the adaptive controller, in samples

    def validate(self) -> None:
        if self.coef < 0:
            raise ConfigError(f"kl.coef must be >= 0, got {self.coef}")
        if self.estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl.estimator must be one of k1, k2, k3; got {self.estimator!r}")
        if self.target is not None and not self.target > 0:
            raise ConfigError(f"kl.target must be > 0 (or null for a fixed beta), got {self.target}")


@dataclass
class GAEConfig:
    gamma: float = 1.0  # InstructGPT / lm-human-preferences: discount 1
    lam: float = 0.95  # lm-human-preferences: GAE lambda 0.95

    def validate(self) -> None:
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"gae.gamma and gae.lam must be in [0, 1]; got {self.gamma}, {self.lam}")


@dataclass
class PPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PPOData = field(default_factory=PPOData)
    sft_dir: str = ""  # SFT run dir: its adapter initialises the policy and is the frozen reference
    rm_dir: str = ""  # RM run dir: its adapter and head are the frozen reward and initialise the value
    out_dir: str = "runs/ppo"  # the run directory: policy/ and value/ adapters, config.yaml, metrics, checkpoints/
    iterations: int = 30  # ours: rollout batches; the toy world improves within ~30
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    gae: GAEConfig = field(default_factory=GAEConfig)
    ppo_epochs: int = 4  # lm-human-preferences / TRL: 4 PPO epochs per rollout batch
    mini_batch_size: int = 16  # ours: 2 mini-batches per epoch, reshuffled each epoch
    micro_batch_size: int = 16  # ours: rows per forward; gradient accumulation = mini / micro
    clip_eps: float = 0.2  # InstructGPT / PPO paper: clip ratio 0.2
    value_clip_eps: float = 0.2  # openai baselines / TRL cliprange_value 0.2
    vf_coef: float = 0.1  # TRL default; InstructGPT does not state its value-loss weight
    ptx_coef: float = 0.0  # InstructGPT PPO-ptx gamma = 27.8; 0 = plain PPO
    ptx_batch_size: int = 8  # ours: pretraining texts per mini-batch step. Per RL episode that is
    # ptx_batch_size * ppo_epochs * (rollout.batch_size / mini_batch_size) / rollout.batch_size
    # = 8 * 4 * 2 / 32 = 2 texts (InstructGPT: about 8 per episode; 32 here would match it at 4x the ptx cost)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=0, min_lr_ratio=1.0))
    # lr ours (toy world, LoRA): at 2e-4 PPO over-optimised the RM within 30 iterations (gold score
    # fell below SFT's), 1e-4 gained little, 5e-5 the most at the lowest KL; a constant rate (min_lr_ratio 1.0) as in lm-human-preferences; Adam eps 1e-5 (InstructGPT)
    max_nonfinite_in_a_row: int = 3  # ours: a few bad batches are skipped; more means divergence
    auto_halve_micro_batch: bool = False  # ours: on CUDA OOM, halve micro_batch_size and retry
    checkpoint_every: int = 10  # ours: iterations between checkpoints
    keep_last: int = 2  # ours: checkpoints kept on disk
    resume: str = "auto"  # "auto": continue this run from its newest checkpoint; a checkpoint path; "never"
    overwrite: bool = False  # delete a run already in out_dir (another config or stage, or finished) and start over
    seed: int = 0  # python, numpy and torch seeds: sampling and the mini-batch order
    device: str = "auto"  # cuda when available, else cpu
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # bf16 autocast on CUDA (the GPU default); fp32 on CPU

    def validate(self) -> None:
        if self.ptx_coef < 0:
            raise ConfigError(f"ptx_coef must be >= 0, got {self.ptx_coef}")
        if self.iterations < 1 or self.ppo_epochs < 1:
            raise ConfigError("iterations and ppo_epochs must be >= 1")
        if self.rollout.batch_size % self.mini_batch_size:
            raise ConfigError(f"rollout.batch_size={self.rollout.batch_size} must be a multiple of "
                              f"mini_batch_size={self.mini_batch_size}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"mini_batch_size={self.mini_batch_size} must be a multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16, fp16 or fp32; got {self.precision!r}")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint_every and keep_last must be >= 1")

    def check_inputs(self) -> None:
        """The runs and files PPO reads exist (before any model loads)."""
        if not self.sft_dir:
            raise ConfigError("sft_dir: PPO needs the SFT run directory (--sft RUN_DIR) for the policy "
                              "and the frozen reference")
        if not self.rm_dir:
            raise ConfigError("rm_dir: PPO needs a reward model (--rm RUN_DIR)")
        if self.ptx_coef > 0 and not self.data.pretrain:
            raise ConfigError(f"ptx_coef={self.ptx_coef} needs data.pretrain (--pretrain pretrain.jsonl)")
        check_prompt_run_inputs(self.model.path, self.data.path, self.data.pretrain, self.sft_dir, self.rm_dir)


def check_prompt_run_inputs(model_path: str, prompts: str, pretrain: str, sft_dir: str, rm_dir: str) -> None:
    """What a run that samples prompts with the SFT policy and scores them with the RM reads (PPO and
    eval): the model, the prompts file, the pretraining file when given, and the two runs' adapters."""
    require_model_source(model_path, "model.path")
    require_path(prompts, "data.path", "prompts file", "--data prompts.jsonl")
    if pretrain:
        require_path(pretrain, "data.pretrain", "pretraining file", "--pretrain pretrain.jsonl")
    adapter_dir(sft_dir, "policy")
    adapter_dir(rm_dir, "reward")

"""`ToyConfig`: the size of the toy world, the shape of its base model and how long it is pretrained."""

from dataclasses import dataclass, field, fields

from rlhf.errors import ConfigError


@dataclass
class ToyConfig:
    """Everything `write_toy_world` needs; the defaults write the project's default toy world."""

    seed: int = 0  # ours: the same seed gives byte-identical data files and the same weights

    # the world: users and the three prompt sets, drawn separately as in the paper
    n_users: int = 60  # ours: enough users that a 10-20% user-id split still holds several
    n_sft_prompts: int = 2000  # InstructGPT: ~13k SFT prompts; scaled down so SFT takes ~1 min on CPU
    n_rm_prompts: int = 1000  # InstructGPT: ~33k RM prompts; ours: K ~6.5 answers, ~19 pairs each
    n_rl_prompts: int = 1000  # InstructGPT: ~31k PPO prompts; ours: more than a CPU PPO run uses
    n_pretrain_texts: int = 8000  # ours: ~6 passes in the default pretraining run
    min_k: int = 4  # InstructGPT: labellers rank K = 4..9 answers per prompt
    max_k: int = 9  # InstructGPT: K = 4..9
    demo_wrong_rate: float = 0.2  # ours: demonstrations slightly wrong, like human ones
    demo_sloppy_rate: float = 0.6  # ours: > 0.5 so an SFT model's likeliest token after an answer is "."

    # the base model (transformers LlamaConfig; intermediate size is 4 * hidden_size)
    hidden_size: int = 128  # ours: small enough for CPU PPO, big enough to learn 169 sums
    num_layers: int = 2  # ours: 0.55M parameters; learns every statement kind to ~99% greedy accuracy
    num_heads: int = 4  # ours: head dim 32
    max_position_embeddings: int = 128  # ours: the longest toy prompt + answer is ~20 tokens

    # pretraining from random init (AdamW, linear warm-up then cosine decay)
    pretrain_steps: int = 800  # ours: 400 leave sums and reversals half learnt; ~30 s on 2 idle CPU cores
    batch_size: int = 64  # ours: texts per step (~12 tokens each)
    lr: float = 3e-3  # ours: a 0.5M-parameter model tolerates a high rate
    warmup_steps: int = 40  # ours: 5% of the steps
    min_lr_ratio: float = 0.1  # InstructGPT SFT: cosine decay to 10% of the peak rate
    weight_decay: float = 0.01  # ours
    grad_clip: float = 1.0  # ours: the usual global-norm clip

    @classmethod
    def quick(cls, **overrides) -> "ToyConfig":
        """A small world for tests: a few hundred records and a few pretraining steps (seconds)."""
        small = dict(n_users=12, n_sft_prompts=200, n_rm_prompts=100, n_rl_prompts=100,
                     n_pretrain_texts=500, hidden_size=64, pretrain_steps=30, warmup_steps=3,
                     batch_size=32)
        return cls(**{**small, **overrides})

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that is mistyped or out of range."""
        for field in fields(self):
            value = getattr(self, field.name)
            allowed = (int, float) if field.type is float else field.type  # an int is a fine float
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise ConfigError(f"toy.{field.name}: expected {field.type.__name__}, got {value!r}")
        for name in ("n_sft_prompts", "n_rm_prompts", "n_rl_prompts", "n_pretrain_texts", "hidden_size",
                     "num_layers", "num_heads", "pretrain_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"toy.{name}={getattr(self, name)}: must be >= 1")
        if self.n_users < 2:
            raise ConfigError(f"toy.n_users={self.n_users}: need >= 2 users to split by user id")
        if not 2 <= self.min_k <= self.max_k:
            raise ConfigError(f"toy.min_k={self.min_k}, toy.max_k={self.max_k}: need 2 <= min_k <= max_k")
        if self.max_k > 12:
            raise ConfigError(f"toy.max_k={self.max_k}: the toy labeller ranks at most 12 distinct answers")
        for name in ("demo_wrong_rate", "demo_sloppy_rate", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"toy.{name}={getattr(self, name)}: must be in [0, 1]")
        head_dim, remainder = divmod(self.hidden_size, self.num_heads)
        if remainder or head_dim % 2:
            raise ConfigError(
                f"toy.hidden_size={self.hidden_size}: must split into toy.num_heads={self.num_heads} heads "
                f"of even size (rotary embeddings); e.g. hidden_size={2 * self.num_heads * max(1, head_dim // 2)}"
            )
        if self.max_position_embeddings < 32:
            raise ConfigError(f"toy.max_position_embeddings={self.max_position_embeddings}: need >= 32, "
                              "the longest toy text is ~30 tokens")
        if not 0 <= self.warmup_steps <= self.pretrain_steps:
            raise ConfigError(f"toy.warmup_steps={self.warmup_steps}: must be in [0, toy.pretrain_steps="
                              f"{self.pretrain_steps}]")
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"toy.{name}={getattr(self, name)}: must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"toy.weight_decay={self.weight_decay}: must be >= 0")


@dataclass
class ToyRunConfig:
    out_dir: str = "runs/toy"  # the world: sft, rankings, prompts and pretrain .jsonl files and model/
    overwrite: bool = False  # rewrite a world written with another config
    toy: ToyConfig = field(default_factory=ToyConfig)

"""`ModelConfig`: which base to load, how to quantize it, and the shape of the LoRA adapters over it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.errors import ConfigError

QUANTIZATIONS = ("nf4", "none")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
TARGET_MODULE_PRESETS = ("auto", "all-linear")


@dataclass
class ModelConfig:
    path: str = ""
    """A local Hugging Face causal-LM directory, a Hub id (plain `from_pretrained`: HF cache, HF_HUB_OFFLINE)
    or a `.gguf` file (converted once beside it; rlhf/models/gguf_import.py).
    Required: the stages fill it from `--model`; the toy world writes one to `<out>/model`."""

    # design card + QLoRA (Dettmers et al. 2023): LoRA over one 4-bit NF4 base; "none" for CPU-speed runs
    quantization: Literal["nf4", "none"] = "nf4"
    lora_r: int = 16  # ours: the usual LoRA rank for 0.1-7B models (QLoRA used 64); the toy needs no more
    lora_alpha: float = 32.0  # ours: alpha = 2 * r, the common choice; LoRA scales its update by alpha / r
    lora_dropout: float = 0.0  # InstructGPT: dropout off in policy, reference, reward and value during RL

    target_modules: str | list[str] = "auto"
    """"auto": every attention and MLP projection of the architecture (table in rlhf/models/base.py;
    QLoRA found adapting all layers is what matches full fine-tuning); "all-linear": peft's rule, every
    linear layer but the output head; or an explicit list of module names."""

    gradient_checkpointing: bool = False  # ours: the toy models fit easily; turn on for 1B+ models on one GPU

    # MISSION numerics: bf16 is the GPU default (fp16 overflows without care); "auto": bf16 on CUDA, fp32 on CPU
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"

    def validate(self) -> None:
        # an empty path is allowed here: the pipeline fills it in; each stage's check_inputs and
        # RoleModel refuse to load without one
        if not isinstance(self.path, str):
            raise ConfigError(f"model.path must be a string (a model directory, .gguf file or Hub id), got {self.path!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"model.quantization must be 'nf4' or 'none', got {self.quantization!r}")
        if not _is_number(self.lora_r, int) or self.lora_r < 1:
            raise ConfigError(f"model.lora_r must be an integer >= 1, got {self.lora_r!r}")
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            raise ConfigError(f"model.lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self._validate_target_modules()
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"model.gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            choices = ", ".join(map(repr, COMPUTE_DTYPES))
            raise ConfigError(f"model.compute_dtype must be one of {choices}, got {self.compute_dtype!r}")

    def _validate_target_modules(self) -> None:
        modules = self.target_modules
        if isinstance(modules, str):
            if modules not in TARGET_MODULE_PRESETS:
                raise ConfigError(
                    f"model.target_modules must be 'auto', 'all-linear' or a list of module names, got {modules!r}"
                )
            return
        if not (isinstance(modules, (list, tuple)) and modules and all(isinstance(m, str) and m for m in modules)):
            raise ConfigError(
                f"model.target_modules must be 'auto', 'all-linear' or a non-empty list of module names, "
                f"got {modules!r}"
            )


def _is_number(value, kind: type | tuple[type, ...] = (int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)  # YAML `true` is not a rank

"""A role on disk: a plain peft adapter dir (`PeftModel.from_pretrained(base, dir)` loads it) plus
`head.safetensors` when the role has a scalar head."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import save_file
import torch
from torch import nn

from rlhf.errors import ModelError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def save_adapter(peft_model: PeftModel, adapter: str, out_dir: Path, conv1d_targets: set[str]) -> None:
    """Write `adapter`'s config and weights to `out_dir` as peft itself would for an adapter named
    "default" (peft's save_pretrained puts any other name in a sub-directory).

    `conv1d_targets`: the target names that are Conv1D ([in, out] weights, GPT-2) in the unquantized
    base. NF4 loading turns them into Linear4bit, so an adapter trained over NF4 carries
    `fan_in_fan_out=False`; the saved config says True, which is what the unquantized base needs (the
    LoRA weights themselves are the same either way) and what peft would otherwise warn about and flip.
    """
    lora_config = copy.deepcopy(peft_model.peft_config[adapter])
    lora_config.inference_mode = True  # as peft saves it; is_trainable=True at load turns it back on
    if conv1d_targets and _targets(lora_config) & conv1d_targets:
        lora_config.fan_in_fan_out = True
    lora_config.save_pretrained(str(out_dir))
    weights = get_peft_model_state_dict(peft_model, adapter_name=adapter, save_embedding_layers=False)
    tensors = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def _targets(lora_config: LoraConfig) -> set[str]:
    """The adapter's target modules and (MoE expert) target parameters."""
    found = set()
    for targets in (lora_config.target_modules, getattr(lora_config, "target_parameters", None)):
        found |= {targets} if isinstance(targets, str) else set(targets or ())
    return found


def read_lora_config(adapter_dir: Path) -> LoraConfig:
    """The LoRA config saved in `adapter_dir`, trainability left to the caller."""
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise ModelError(
            f"adapter dir '{adapter_dir}' has no {ADAPTER_CONFIG_FILE} (expected a dir written by save_role)"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS_FILE).is_file():
        raise ModelError(f"adapter dir '{adapter_dir}' has no {ADAPTER_WEIGHTS_FILE}")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if not isinstance(config, LoraConfig):
        raise ModelError(f"{adapter_dir}: expected a LoRA adapter, found {type(config).__name__}")
    config.inference_mode = False  # trainability is ours to set (RoleModel keeps its own flags)
    return config


def load_adapter_weights(peft_model: PeftModel, adapter: str, adapter_dir: Path, device: str) -> None:
    """Fill the (already attached) adapter from `adapter_dir`; every tensor must fit, none may be missing."""
    weights = load_peft_weights(str(adapter_dir), device=device)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter)
    if result.unexpected_keys:
        raise ModelError(
            f"{adapter_dir}: {len(result.unexpected_keys)} adapter tensors do not fit this base, "
            f"e.g. {result.unexpected_keys[0]}"
        )
    # a partial file would leave the rest of the adapter at its fresh init without a word
    missing = [key for key in result.missing_keys if f".{adapter}." in key]
    if missing:
        raise ModelError(f"{adapter_dir}: {len(missing)} adapter tensors are missing, e.g. {missing[0]}")


def conv1d_module_names(model: nn.Module) -> set[str]:
    """Short names of the modules the unquantized architecture stores as transformers' Conv1D
    (GPT-2's c_attn, c_proj, c_fc), read from a weightless copy built on the meta device: an NF4
    model has already turned them into Linear4bit."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model.config)
    except (ValueError, TypeError, KeyError):  # a custom architecture transformers cannot rebuild
        skeleton = model
    return {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules() if isinstance(module, Conv1D)}


def check_lora_options(cfg, lora_config: LoraConfig, adapter_dir: Path) -> None:
    """Refuse LoRA options that cannot take effect on a loaded adapter (it keeps its own rank, alpha
    and targets). An option left at its default, or equal to the adapter's value, is fine: a
    pipeline passes the SFT run's own options to every stage."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    saved = {"lora_r": lora_config.r, "lora_alpha": lora_config.lora_alpha}
    for field, value in saved.items():
        asked = getattr(cfg, field)
        if asked != defaults[field] and asked != value:
            raise ModelError(_ignored_option(f"model.{field}={asked}", adapter_dir, lora_config))
    asked_targets = cfg.target_modules
    if isinstance(asked_targets, (list, tuple)):
        if set(asked_targets) != _targets(lora_config):
            raise ModelError(_ignored_option(f"model.target_modules={list(asked_targets)}", adapter_dir, lora_config))


def _ignored_option(option: str, adapter_dir: Path, lora_config: LoraConfig) -> str:
    targets = sorted(_targets(lora_config))
    return (f"{option} cannot apply to the adapter loaded from '{adapter_dir}', which keeps its own values "
            f"(r={lora_config.r}, lora_alpha={lora_config.lora_alpha:g}, target_modules={targets}); "
            f"drop the option or give those values")

"""Every use of peft beyond its documented API, in one place.

RoleModel switches adapters a dozen times per PPO iteration and mixes roles within one forward,
which peft's public API does slowly (`set_adapter` walks every module and resets requires_grad) or
not at all. What that needs from peft's LoRA layers is listed in `REQUIRED_LAYER_ATTRIBUTES`: two
private flags each layer's forward reads, and the public per-adapter containers whose arithmetic
`rlhf.models.row_mixing` reproduces. `tests/test_peft_internals.py` checks them against the
installed peft and names the attribute and the tested range when a release changes them; at run
time a peft without the private flags falls back to the public (slower) switch.

Tested range: `TESTED_PEFT` (pinned in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import warnings

from peft.tuners.lora import LoraLayer
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

TESTED_PEFT = ">=0.20,<0.22"  # test_peft_internals, test_models, test_model_families pass on 0.20.0 and 0.21.2

# private: the two flags a LoRA layer's forward reads to decide which adapter's update it adds
PRIVATE_LAYER_FLAGS = ("_disable_adapters", "_active_adapter")
# public per-adapter containers (dicts keyed by adapter name) that the row-mixed forward reads
LORA_ARITHMETIC_ATTRIBUTES = ("lora_A", "lora_B", "lora_dropout", "scaling", "use_dora", "lora_variant",
                              "adapter_layer_names")
REQUIRED_LAYER_ATTRIBUTES = PRIVATE_LAYER_FLAGS + LORA_ARITHMETIC_ATTRIBUTES


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """Every module peft wrapped (one per targeted projection)."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def missing_layer_attributes(layer: nn.Module) -> list[str]:
    """The attributes of REQUIRED_LAYER_ATTRIBUTES this peft's LoRA layer lacks ([] when all is well)."""
    return [name for name in REQUIRED_LAYER_ATTRIBUTES if not hasattr(layer, name)]


def supports_fast_switch(layers: list[BaseTunerLayer]) -> bool:
    """Whether every layer has the private flags `show_adapter` sets (else use peft's set_adapter)."""
    return all(hasattr(layer, flag) for layer in layers for flag in PRIVATE_LAYER_FLAGS)


def show_adapter(layers: list[BaseTunerLayer], tuner: nn.Module, adapter: str | None) -> None:
    """Make `adapter` the one each layer's forward adds (None: the base output only).

    The same end state as peft's `enable_adapter_layers` + `set_adapter(adapter)` for the forward,
    without its walk over every module and its reset of requires_grad (about 2 ms per switch on a
    tiny model, a dozen switches per PPO iteration).
    """
    for layer in layers:
        layer._disable_adapters = adapter is None
        if adapter is not None:
            layer._active_adapter = [adapter]
    if adapter is not None:
        tuner.active_adapter = adapter  # what peft reads when it saves or reports the active adapter


def hide_adapters(layers: list[BaseTunerLayer]) -> None:
    """Each layer returns its base output only (the row-mixed forward adds the roles' updates)."""
    for layer in layers:
        layer._disable_adapters = True


def is_plain_lora(layer: nn.Module, adapter: str) -> bool:
    """Whether `adapter` on this layer computes base(x) + lora_B(lora_A(dropout(x))) * scaling (or is
    absent), the only form the row-mixed forward reproduces: a LoRA Linear (nn.Linear, GPT-2's
    Conv1D, a bitsandbytes 4/8-bit Linear), without DoRA, a variant or a LoRA bias. Embedding, conv
    and parameter (MoE expert) wrappers compute something else."""
    if adapter not in getattr(layer, "lora_A", {}) and adapter not in getattr(layer, "lora_embedding_A", {}):
        return True  # not targeted here: nothing to add for it
    if not _is_lora_linear(layer) or adapter in getattr(layer, "lora_embedding_A", {}):
        return False
    return (not layer.use_dora.get(adapter, False)
            and adapter not in getattr(layer, "lora_variant", {})
            and getattr(layer.lora_B[adapter], "bias", None) is None)


def _is_lora_linear(layer: nn.Module) -> bool:
    if isinstance(layer, LoraLinear):
        return True
    # bitsandbytes' LoRA layers live in peft.tuners.lora.bnb, defined only when bitsandbytes imports
    return isinstance(layer, LoraLayer) and type(layer).__name__ in ("Linear4bit", "Linear8bitLt")


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA weights of `adapter` in every tuner layer (lora_A, lora_B, lora_embedding_A, ...)."""
    parameters = []
    for layer in tuner_layers(model):
        for layer_name in layer.adapter_layer_names:
            per_adapter = getattr(layer, layer_name)
            if adapter in per_adapter:
                entry = per_adapter[adapter]
                parameters.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return parameters


@contextlib.contextmanager
def quiet_peft_deprecations():
    """peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield

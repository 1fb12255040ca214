"""Which adapter the next forward adds: one role, none (the bare base), or one role per slice of rows.

Two peft behaviours shape this class:
- `set_adapter` (and re-enabling adapters) makes the active adapter trainable and every other one
  frozen. PPO trains `policy` and `value` together while `reference` and `reward` stay frozen, so
  the role registry keeps its own `trainable` flags and `restore_flags` re-applies them after any
  switch through peft's public API. The fast path (`peft_internals.show_adapter`) sets only the
  flags the forward reads and leaves requires_grad alone.
- With gradient checkpointing the backward pass re-runs each layer's forward. If the role changed
  between forward and backward (policy forward, value forward, then one backward), the re-run would
  use the wrong adapter and give silently wrong gradients; `checkpoint_contexts` makes the recompute
  switch back to the role of the original forward.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from rlhf.models import peft_internals
from rlhf.models.row_mixing import RowRoles, add_row_deltas


class AdapterSwitch:
    """`activate(role)` before a forward; `active` is what the last activation chose.

    `restore_flags()` re-applies the roles' trainable flags (called after peft's public switch).
    """

    def __init__(self, causal_lm: nn.Module, restore_flags: Callable[[], None]):
        self._causal_lm = causal_lm
        self._restore_flags = restore_flags
        self._peft_model = None  # set by refresh() once the first adapter exists
        # None: no adapter in the forward (the bare base); a RowRoles: one role per slice of rows
        self.active: str | None | RowRoles = None
        # the LoRA layers, when this peft allows the fast switch (else [] and peft's public path)
        self.lora_layers: list[nn.Module] = []
        # the row hook on every LoRA layer while a RowRoles forward is active, and only then: a module
        # with a hook takes torch's slower call path, which would tax every other forward
        self._row_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._training: bool | None = None  # the mode last set on the whole model (None: unknown)

    def refresh(self, peft_model) -> None:
        """After peft added or deleted an adapter: collect the LoRA layers again (a new target module
        brings new ones) and restore the active role and the trainable flags."""
        self._peft_model = peft_model
        self._public_switch(None if isinstance(self.active, RowRoles) else self.active)
        layers = peft_internals.tuner_layers(self._causal_lm)
        self.lora_layers = layers if peft_internals.supports_fast_switch(layers) else []
        self._training = None  # new LoRA modules (their dropout) start in train mode whatever the model's

    def activate(self, role: str | None | RowRoles) -> None:
        if role == self.active:
            return
        if isinstance(role, RowRoles):
            peft_internals.hide_adapters(self.lora_layers)  # base output only: the hook adds the updates
            if not self._row_hooks:
                self._row_hooks = [layer.register_forward_hook(self._row_hook) for layer in self.lora_layers]
            self.active = role
            return
        self._remove_row_hooks()
        if not self.lora_layers:
            self._public_switch(role)
            return
        peft_internals.show_adapter(self.lora_layers, self._peft_model.base_model, role)
        self.active = role

    def set_training(self, training: bool) -> None:
        """Train mode while autograd records (LoRA dropout on), eval otherwise; only when it changes,
        since `train()` walks every module (about 1 ms per call on a tiny model)."""
        if self._training != training:
            self._causal_lm.train(training)
            self._training = training

    @contextlib.contextmanager
    def use(self, role: str | None | RowRoles):
        """Run the wrapped code with `role` active, then restore the previously active one."""
        previous = self.active
        self.activate(role)
        try:
            yield
        finally:
            self.activate(previous)

    def checkpoint_contexts(self):
        """torch.utils.checkpoint `context_fn`: run each layer's backward recompute with the role
        (or rows of roles) that was active during its forward."""
        return contextlib.nullcontext(), self.use(self.active)

    def _row_hook(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return add_row_deltas(self.active, layer, args[0], output)

    def _remove_row_hooks(self) -> None:
        for handle in self._row_hooks:
            handle.remove()
        self._row_hooks = []

    def _public_switch(self, role: str | None) -> None:
        """peft's own switch (slower: it walks every module and resets requires_grad)."""
        self._remove_row_hooks()
        if self._peft_model is not None:
            tuner = self._peft_model.base_model
            if role is None:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                self._peft_model.set_adapter(role)
        self.active = role
        self._restore_flags()

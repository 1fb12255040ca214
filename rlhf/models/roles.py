"""`RoleModel`: one frozen base, named LoRA adapters over it, a scalar head where a role needs one.

InstructGPT uses four networks: the policy, the reference (the frozen SFT model), the reward model
and the value function. Here they are four LoRA adapters ("roles") over one shared, frozen,
possibly 4-bit base: switching role switches which adapter's low-rank update is added inside each
projection, so the base weights exist once whatever the number of roles.

This file is the role registry and the forward passes. Around it:
- `adapter_switch`: which adapter the next forward adds (peft's switch resets trainable flags;
  gradient checkpointing must recompute with the forward's role);
- `row_mixing`: several roles over one stack of rows in one forward (PPO's update);
- `adapter_files`: a role on disk as a plain peft adapter dir plus its head;
- `logit_transform`: the family's scale or softcap after the LM head, for the fused kernels;
- `peft_internals`: every use of peft beyond its documented API.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rlhf.errors import ModelError
from rlhf.models import peft_internals
from rlhf.models.adapter_files import (
    check_lora_options,
    conv1d_module_names,
    load_adapter_weights,
    read_lora_config,
    save_adapter,
)
from rlhf.models.adapter_switch import AdapterSwitch
from rlhf.models.base import decoder_body, has_conv1d, load_base_model, load_tokenizer, new_lora_config, resolve_device
from rlhf.models.config import ModelConfig
from rlhf.models.heads import HEAD_FILE, ScalarHead, last_true_index, load_head_weights, new_head, save_head
from rlhf.models.logit_transform import check_logits_reproduced, logit_transform_of
from rlhf.models.row_mixing import RowsNotAligned, group_parts, stack_parts, unstack_parts
from rlhf.models.sampling import check_left_padded, sample_with_cache
from rlhf_kernels import fused_linear_token_logprobs

log = logging.getLogger("rlhf.models")


@dataclass
class _Role:
    trainable: bool
    adapter_parameters: list[nn.Parameter]  # this role's LoRA A/B weights, found once at add time
    head: ScalarHead | None


class RoleModel:
    """The shared base plus its roles. See the module docstring; names follow docs/ARCHITECTURE.md.

    Attributes: `config` (ModelConfig), `device`, `tokenizer` (its own pad, maybe the EOS), `roles`,
    `logit_transform` (the fused kernels' kwargs for this family's logits).
    Every method takes the role explicitly (`None` = the bare base, adapters disabled); the adapter
    it activates stays active until another is asked for. Forward passes run in train mode when
    autograd is recording (LoRA dropout and gradient checkpointing apply) and eval mode otherwise;
    the base's own dropout is off in both.
    """

    def __init__(self, cfg: ModelConfig, device: str | torch.device | None = None):
        cfg.validate()
        self.config = cfg
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(cfg.path)
        # the transformers model; peft wraps its projections in place, so it always sees the active adapter
        self._causal_lm = load_base_model(cfg, self.tokenizer, self.device)
        self._decoder = decoder_body(self._causal_lm)
        self._hidden_size = self._causal_lm.get_input_embeddings().weight.shape[1]
        self.logit_transform: dict[str, float] = logit_transform_of(self._causal_lm.config)
        check_logits_reproduced(self._causal_lm, self._decoder, self.logit_transform, self.device)
        self._conv1d_targets = conv1d_module_names(self._causal_lm)
        self._peft_model: PeftModel | None = None  # built by the first add_role
        self._roles: dict[str, _Role] = {}
        self._switch = AdapterSwitch(self._causal_lm, self._apply_trainable_flags)
        self._row_mixable: set[str] = set()  # adapters the row-mixed forward can apply (plain LoRA everywhere)
        self._row_mixing_failed = False  # a LoRA layer's input could not be split by rows (see row_mixing)
        if cfg.gradient_checkpointing:
            self._causal_lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._switch.checkpoint_contexts}
            )

    # ---- roles ------------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self._roles)

    def add_role(
        self,
        name: str,
        adapter_dir: str | Path | None = None,
        trainable: bool = False,
        head: str | None = None,
    ) -> None:
        """Add a LoRA adapter called `name`, fresh (equal to the base) or loaded from `adapter_dir`.

        A fresh adapter takes its rank, alpha and targets from the ModelConfig; a loaded one keeps
        its own, and a ModelConfig that asks for other values than the default and the adapter's is
        refused (the option could not take effect). Dropout is always this run's: SFT may train with
        it, PPO runs without it, as InstructGPT does.

        `head` ("reward" | "value" | None) gives the role a scalar head, loaded from
        `adapter_dir/head.safetensors` when that file exists and fresh otherwise (the RM starts from
        the SFT adapter, which has no head); without `head` a head file is not read (the policy
        may start from any role's dir). `trainable` sets requires_grad on the adapter and head.
        """
        self._check_new_role_name(name)
        head_module = new_head(head, self._hidden_size).to(self.device) if head is not None else None
        if adapter_dir is None:
            self._attach_adapter(name, new_lora_config(self.config, self._causal_lm))
        else:
            adapter_dir = Path(adapter_dir)
            lora_config = read_lora_config(adapter_dir)
            check_lora_options(self.config, lora_config, adapter_dir)
            lora_config.lora_dropout = self.config.lora_dropout
            # the layout of this base's projections (Conv1D unquantized, Linear4bit in NF4), not the saver's
            lora_config.fan_in_fan_out = has_conv1d(self._causal_lm)
            self._attach_adapter(name, lora_config)
            try:
                load_adapter_weights(self._peft_model, name, adapter_dir, str(self.device))
            except ModelError:
                self._peft_model.delete_adapter(name)  # leave no half-loaded adapter behind
                self._after_adapter_change()
                raise
            if head_module is not None and (adapter_dir / HEAD_FILE).is_file():
                load_head_weights(head_module, adapter_dir / HEAD_FILE)
        parameters = peft_internals.adapter_parameters(self._peft_model, name)
        assert parameters, f"adapter {name!r} has no parameters"
        self._roles[name] = _Role(trainable, parameters, head_module)
        self._apply_trainable_flags()

    def head(self, role: str) -> ScalarHead | None:
        return self._role(role).head

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The role's own parameters: its LoRA weights and its head's. They require grad iff the
        role is trainable; the base's parameters are never among them."""
        found = self._role(role)
        head_parameters = list(found.head.parameters()) if found.head is not None else []
        return found.adapter_parameters + head_parameters

    def save_role(self, role: str, out_dir: str | Path) -> Path:
        """Write the role as a plain peft adapter dir (`PeftModel.from_pretrained(base, out_dir)`
        loads it on the unmodified, unquantized base without a warning) plus `head.safetensors` when
        the role has a head. The base's embeddings are never resized (see base.load_tokenizer), so
        the adapter loads on the model exactly as shipped."""
        found = self._role(role)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_adapter(self._peft_model, role, out_dir, self._conv1d_targets)
        if found.head is not None:
            save_head(found.head, out_dir / HEAD_FILE)
        return out_dir

    @contextlib.contextmanager
    def use(self, role: str | None):
        """`with model.use("policy"): ...` runs the wrapped code with that adapter (None: the bare
        base) and restores the previously active one afterwards."""
        if role is not None:
            self._role(role)
        with self._switch.use(role):
            yield self

    # ---- forward passes ---------------------------------------------------------------------

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The unembedding, [V, H], for the fused log-prob kernels (the input embedding when tied)."""
        return self._causal_lm.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return self._causal_lm.get_output_embeddings().bias

    def hidden_states(
        self, role: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The LM head's input (after the final norm), [B, S, H], without building [B, S, V] logits.

        Position ids count real tokens only, so a left-padded sequence gets the same positions as
        the unpadded one (as `generate` does); pad positions hold values no caller should read.
        """
        if role is not None:
            self._role(role)
        return self._hidden_states(role, input_ids, attention_mask)

    def hidden_states_of_parts(
        self, parts: list[tuple[str, torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """`[hidden_states(role, input_ids, attention_mask) for role, input_ids, attention_mask in parts]`
        in as few forward passes as is worth it (PPO's update: the rollout rows through policy and
        value, the pretraining rows through the policy).

        Parts of similar length (rlhf.models.row_mixing.PAD_TO_SHARE) are stacked and run as one
        forward: every projection's base part runs once over all their rows and each role's LoRA
        update goes to its own rows. A much shorter part gets a forward of its own rather than being
        padded. Same values and gradients as separate forwards. Roles whose adapter is not plain LoRA
        everywhere (DoRA, variants, a LoRA bias, MoE expert parameters), or a model whose LoRA layers
        see tokens in another order than the rows, fall back to separate forwards.
        """
        for role, _, _ in parts:
            self._role(role)
        separate = [lambda part=part: self._hidden_states(*part) for part in parts]
        if len(parts) < 2 or self._row_mixing_failed or not all(role in self._row_mixable for role, _, _ in parts):
            return [forward() for forward in separate]
        hidden: list[torch.Tensor | None] = [None] * len(parts)
        try:
            for group in group_parts([input_ids.shape[1] for _, input_ids, _ in parts]):
                for index, piece in zip(group, self._stacked_forward([parts[i] for i in group])):
                    hidden[index] = piece
        except RowsNotAligned as err:
            log.info("row-mixed forward unavailable for this model (%s): one forward per part", err)
            self._row_mixing_failed = True
            return [forward() for forward in separate]
        return hidden

    def _stacked_forward(self, parts: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        if len(parts) == 1:
            return [self._hidden_states(*parts[0])]
        input_ids, attention_mask, rows = stack_parts(parts, self.tokenizer.pad_token_id)  # [R, L] each
        hidden = self._hidden_states(rows, input_ids, attention_mask)  # [R, L, H]
        return unstack_parts(hidden, rows, [part_ids.shape[1] for _, part_ids, _ in parts])

    def _hidden_states(self, active, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._switch.activate(active)
        self._switch.set_training(torch.is_grad_enabled())
        attention_mask = attention_mask.to(torch.long)  # [B, S]
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [B, S]
        output = self._decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return output.last_hidden_state  # [B, S, H]

    def token_logprobs(
        self,
        role: str | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """log p(labels[b, s] | tokens up to s), [B, S] fp32; 0 where labels == -100.

        `labels` are already shifted by the caller (labels[:, s] is the token after position s).
        Goes through the fused linear + log-softmax kernel, which never holds more than a chunk of
        the [B * S, V] logits, with the family's logit transform.
        """
        hidden = self.hidden_states(role, input_ids, attention_mask)  # [B, S, H]
        batch_size, seq_len, hidden_size = hidden.shape
        logprobs = fused_linear_token_logprobs(
            hidden.reshape(batch_size * seq_len, hidden_size),  # [N, H]
            self.lm_head_weight,  # [V, H]
            labels.reshape(batch_size * seq_len),  # [N]
            bias=self.lm_head_bias,
            temperature=temperature,
            **self.logit_transform,
        )  # [N]
        return logprobs.view(batch_size, seq_len)  # [B, S]

    def reward_scores(
        self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The head's score at each sequence's last real token, [B] fp32 (right or left padding).

        score = linear(h_last) + offset, the offset shifting demonstrations to 0 on average.
        """
        head = self._head_or_raise(role)
        if not bool(attention_mask.to(torch.bool).any(dim=-1).all()):
            raise ValueError("a row of attention_mask has no real token: nothing to score")
        hidden = self.hidden_states(role, input_ids, attention_mask)  # [B, S, H]
        last_index = last_true_index(attention_mask)  # [B]
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # [B]
        return head(hidden[rows, last_index])  # [B]

    def values(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head at every position, [B, S] fp32 (pad positions hold meaningless values)."""
        head = self._head_or_raise(role)
        return head(self.hidden_states(role, input_ids, attention_mask))  # [B, S]

    @torch.no_grad()
    def sample(
        self,
        role: str | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """Draw one answer per left-padded prompt from softmax(logits / temperature), [B, P + T].

        The rollout's sampler: the same draws and output layout as transformers' `generate` with
        those arguments and no other reshaping (same seed, same tokens) through a lean KV-cache loop
        (`rlhf.models.sampling`); nothing from a shipped generation_config can reshape the distribution.
        """
        check_left_padded(attention_mask, "sample")
        if role is not None:
            self._role(role)
        self._switch.activate(role)
        self._switch.set_training(False)
        return sample_with_cache(
            self._causal_lm, input_ids, attention_mask.to(torch.long), max_new_tokens,
            eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
            temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens,
        )  # [B, P + T]

    # ---- internals ----------------------------------------------------------------------------

    def _role(self, role: str) -> _Role:
        if role not in self._roles:
            known = ", ".join(self._roles) or "none yet"
            raise ModelError(f"unknown role {role!r} (roles added: {known})")
        return self._roles[role]

    def _head_or_raise(self, role: str) -> ScalarHead:
        head = self._role(role).head
        if head is None:
            raise ModelError(f"role {role!r} has no scalar head; add it with head='reward' or head='value'")
        return head

    def _check_new_role_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ModelError(f"role name must be a non-empty string without '.', got {name!r}")
        if name in self._roles:
            raise ModelError(f"role {name!r} already exists")

    def _attach_adapter(self, name: str, lora_config: LoraConfig) -> None:
        """Inject adapter `name` into the base; the active role is unchanged afterwards."""
        try:
            with peft_internals.quiet_peft_deprecations():
                if self._peft_model is None:
                    self._peft_model = get_peft_model(self._causal_lm, lora_config, adapter_name=name)
                else:
                    self._peft_model.add_adapter(name, lora_config)
        except ValueError as err:  # e.g. target modules absent from this architecture
            raise ModelError(f"cannot add LoRA adapter {name!r}: {err}") from None
        # get_peft_model activates its adapter and add_adapter may touch flags: restore our state
        self._after_adapter_change()

    def _after_adapter_change(self) -> None:
        self._switch.refresh(self._peft_model)
        layers = peft_internals.tuner_layers(self._causal_lm)
        adapters = set(self._peft_model.peft_config) if self._peft_model is not None else set()
        self._row_mixable = {adapter for adapter in adapters if self._switch.lora_layers
                             and all(peft_internals.is_plain_lora(layer, adapter) for layer in layers)}

    def _apply_trainable_flags(self) -> None:
        for role in self._roles.values():
            for parameter in role.adapter_parameters:
                parameter.requires_grad_(role.trainable)
            if role.head is not None:
                role.head.requires_grad_(role.trainable)

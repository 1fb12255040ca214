"""`RoleModel`: one frozen base, named LoRA adapters over it, a scalar head where a role needs one.

InstructGPT uses four networks: the policy, the reference (the frozen SFT model), the reward model
and the value function. Here they are four LoRA adapters ("roles") over one shared, frozen,
possibly 4-bit base: switching role switches which adapter's low-rank update is added inside each
projection, so the base weights exist once whatever the number of roles.

Two peft behaviours this class works around:
- `set_adapter` (and re-enabling adapters) makes the active adapter trainable and every other one
  frozen. PPO trains `policy` and `value` together while `reference` and `reward` stay frozen, so
  each role keeps its own `trainable` flag and the flags are re-applied after every switch.
- peft can mix adapters within one batch (`adapter_names`) only at inference and through
  list-indexed copies that cost more than they save. PPO's update runs the same rows through the
  policy and the value roles, and pretraining rows through the policy; `hidden_states_of_parts`
  does that in one forward: the base part of every projection runs once over all the rows, and a
  forward hook on each LoRA layer adds each role's low-rank update to its own slice of rows.
- With gradient checkpointing the backward pass re-runs each layer's forward. If the role changed
  between forward and backward (policy forward, value forward, then one backward), the re-run would
  use the wrong adapter and give silently wrong gradients; the checkpoint's recompute context
  switches back to the role of the original forward.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from rlhf.errors import ModelError
from rlhf.models.base import (
    decoder_body,
    load_base_model,
    load_tokenizer,
    new_lora_config,
    resolve_device,
)
from rlhf.models.config import ModelConfig
from rlhf.models.heads import HEAD_FILE, ScalarHead, load_head_weights, new_head, save_head
from rlhf.models.sampling import sample_with_cache
from rlhf_kernels import fused_linear_token_logprobs


log = logging.getLogger("rlhf.models")

# hidden_states_of_parts pads a part to share a forward only if it has at least this fraction of the
# longest part's length: padding more would cost more tokens than one pass of per-layer work saves
PAD_TO_SHARE = 0.8
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# generate() arguments that leave softmax(logits / temperature) unchanged (see RoleModel.generate)
UNSHAPED_SAMPLING = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}


@dataclass
class _Role:
    trainable: bool
    adapter_parameters: list[nn.Parameter]  # this role's LoRA A/B weights, found once at add time
    head: ScalarHead | None


class RoleModel:
    """The shared base plus its roles. See the module docstring; names follow docs/ARCHITECTURE.md.

    Attributes: `config` (ModelConfig), `device`, `tokenizer` (its own pad, maybe the EOS), `roles`.
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
        self._peft_model: PeftModel | None = None  # built by the first add_role
        self._roles: dict[str, _Role] = {}
        # None: no adapter in the forward (the bare base); a RowRoles: one role per slice of rows
        self._active: str | None | RowRoles = None
        # the LoRA layers, for switching roles without peft's walk over every module (see _activate)
        self._lora_layers: list[BaseTunerLayer] = []
        # _add_row_deltas on every LoRA layer while a RowRoles forward is active, and only then: a module
        # with a hook takes torch's slower call path, which would tax every other forward
        self._row_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._row_mixable: set[str] = set()  # adapters _add_row_deltas can apply (plain LoRA everywhere)
        self._training: bool | None = None  # the mode last set on the whole model (None: unknown)
        if cfg.gradient_checkpointing:
            self._causal_lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._checkpoint_contexts}
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
            lora_config = _read_lora_config(adapter_dir)
            # rank and targets come from the saved weights; dropout is this run's choice (SFT may
            # train with it, PPO runs without it, as InstructGPT does)
            lora_config.lora_dropout = self.config.lora_dropout
            self._attach_adapter(name, lora_config)
            try:
                self._load_adapter_weights(name, adapter_dir)
            except ModelError:
                self._peft_model.delete_adapter(name)  # leave no half-loaded adapter behind
                self._after_adapter_change()
                raise
            if head_module is not None and (adapter_dir / HEAD_FILE).is_file():
                load_head_weights(head_module, adapter_dir / HEAD_FILE)
        self._roles[name] = _Role(trainable, self._find_adapter_parameters(name), head_module)
        self._apply_trainable_flags()

    def copy_role(self, source: str, name: str, trainable: bool = False) -> None:
        """Add role `name` as an in-memory copy of `source`'s adapter and head (e.g. the value
        function from the RM, as InstructGPT initialises it, or the policy from the reference)."""
        source_role = self._role(source)
        self._check_new_role_name(name)
        self._attach_adapter(name, copy.deepcopy(self._peft_model.peft_config[source]))
        source_weights = get_peft_model_state_dict(self._peft_model, adapter_name=source, save_embedding_layers=False)
        set_peft_model_state_dict(self._peft_model, source_weights, adapter_name=name)
        head_copy = copy.deepcopy(source_role.head) if source_role.head is not None else None
        self._roles[name] = _Role(trainable, self._find_adapter_parameters(name), head_copy)
        self._apply_trainable_flags()

    def set_trainable(self, role: str, trainable: bool) -> None:
        """Freeze or unfreeze a role's adapter and head (e.g. the RM once the RM stage is done)."""
        self._role(role).trainable = trainable
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
        loads it) plus `head.safetensors` when the role has a head.

        Written by hand rather than `PeftModel.save_pretrained`, which puts any adapter not named
        "default" in a sub-directory. The base's embeddings are never resized (see
        base.load_tokenizer), so the adapter loads on the model exactly as shipped.
        """
        found = self._role(role)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lora_config = copy.deepcopy(self._peft_model.peft_config[role])
        lora_config.inference_mode = True  # as peft saves it; is_trainable=True at load turns it back on
        lora_config.save_pretrained(str(out_dir))
        weights = get_peft_model_state_dict(self._peft_model, adapter_name=role, save_embedding_layers=False)
        tensors = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        if found.head is not None:
            save_head(found.head, out_dir / HEAD_FILE)
        return out_dir

    @contextlib.contextmanager
    def use(self, role: str | None):
        """`with model.use("policy"): ...` runs the wrapped code with that adapter (None: the bare
        base) and restores the previously active one afterwards."""
        previous = self._active
        self._activate(role)
        try:
            yield self
        finally:
            self._activate(previous)

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
        return self._hidden_states(role, input_ids, attention_mask)

    def hidden_states_of_parts(
        self, parts: list[tuple[str, torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """`[hidden_states(role, input_ids, attention_mask) for role, input_ids, attention_mask in parts]`
        in as few forward passes as is worth it (PPO's update: the rollout rows through policy and
        value, the pretraining rows through the policy).

        Parts of similar length (within PAD_TO_SHARE of the longest) are stacked, the shorter ones
        right-padded (causal attention: real tokens never see that padding), and run as one forward:
        every projection's base part runs once over all their rows and each role's LoRA update goes
        to its own rows. A much shorter part gets a forward of its own rather than being padded. Same
        values and gradients as separate forwards. Roles whose adapter is not plain LoRA everywhere
        (DoRA, variants, a LoRA bias) fall back to separate forwards.
        """
        for role, _, _ in parts:
            self._role(role)
        if len(parts) < 2 or not all(role in self._row_mixable for role, _, _ in parts):
            return [self._hidden_states(role, input_ids, attention_mask) for role, input_ids, attention_mask in parts]
        groups: list[list[int]] = []  # indices into parts, longest first
        for index in sorted(range(len(parts)), key=lambda i: -parts[i][1].shape[1]):
            if groups and parts[index][1].shape[1] >= PAD_TO_SHARE * parts[groups[-1][0]][1].shape[1]:
                groups[-1].append(index)
            else:
                groups.append([index])
        hidden: list[torch.Tensor | None] = [None] * len(parts)
        for group in groups:
            for index, piece in zip(group, self._stacked_forward([parts[i] for i in group])):
                hidden[index] = piece
        return hidden

    def _stacked_forward(self, parts: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        if len(parts) == 1:
            return [self._hidden_states(*parts[0])]
        length = max(input_ids.shape[1] for _, input_ids, _ in parts)
        all_ids, all_masks, rows, start = [], [], [], 0
        for role, input_ids, attention_mask in parts:
            padding = (0, length - input_ids.shape[1])
            all_ids.append(F.pad(input_ids, padding, value=self.tokenizer.pad_token_id))  # [b, length]
            all_masks.append(F.pad(attention_mask.to(torch.long), padding, value=0))  # [b, length]
            rows.append((role, start, start + input_ids.shape[0]))
            start += input_ids.shape[0]
        hidden = self._hidden_states(RowRoles(rows), torch.cat(all_ids), torch.cat(all_masks))  # [rows, length, H]
        pieces = hidden.split([b - a for _, a, b in rows])  # split, not slices: no zero-filled gradients
        return [piece[:, :input_ids.shape[1]] for piece, (_, input_ids, _) in zip(pieces, parts)]

    def _hidden_states(self, active, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._activate(active)
        self._set_training(torch.is_grad_enabled())
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
        the [B * S, V] logits.
        """
        hidden = self.hidden_states(role, input_ids, attention_mask)  # [B, S, H]
        batch_size, seq_len, hidden_size = hidden.shape
        logprobs = fused_linear_token_logprobs(
            hidden.reshape(batch_size * seq_len, hidden_size),  # [N, H]
            self.lm_head_weight,  # [V, H]
            labels.reshape(batch_size * seq_len),  # [N]
            bias=self.lm_head_bias,
            temperature=temperature,
        )  # [N]
        return logprobs.view(batch_size, seq_len)  # [B, S]

    def reward_scores(
        self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The head's score at each sequence's last real token, [B] fp32 (right or left padding).

        score = linear(h_last) + offset, the offset shifting demonstrations to 0 on average.
        """
        head = self._head_or_raise(role)
        hidden = self.hidden_states(role, input_ids, attention_mask)  # [B, S, H]
        last_index = last_true_index(attention_mask)  # [B]
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # [B]
        return head(hidden[rows, last_index])  # [B]

    def values(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head at every position, [B, S] fp32 (pad positions hold meaningless values)."""
        head = self._head_or_raise(role)
        return head(self.hidden_states(role, input_ids, attention_mask))  # [B, S]

    @torch.no_grad()
    def generate(
        self, role: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, **gen_kwargs
    ) -> torch.Tensor:
        """Sample from the role, [B, P + T]: prompts must be left-padded so every answer starts at P.

        Defaults: sampling on, KV cache on, the tokenizer's pad and EOS ids, and no reshaping of the
        distribution: sampling draws from exactly softmax(logits / temperature), the distribution
        `token_logprobs(..., temperature)` recomputes. Left to itself, transformers would apply its
        global top_k=50 and whatever the model ships in generation_config.json (Qwen2: top_p 0.8,
        top_k 20, repetition_penalty 1.05), and the KL estimate would go negative (MISSION). Any
        `generate` argument overrides these (max_new_tokens, temperature, do_sample=False, ...).
        """
        _check_left_padded(attention_mask, "generate")
        self._activate(role)
        self._set_training(False)
        gen_kwargs.setdefault("do_sample", True)
        if gen_kwargs["do_sample"]:
            for name, neutral_value in UNSHAPED_SAMPLING.items():
                gen_kwargs.setdefault(name, neutral_value)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        gen_kwargs.setdefault("use_cache", True)
        return self._causal_lm.generate(
            input_ids=input_ids, attention_mask=attention_mask.to(torch.long), **gen_kwargs
        )  # [B, P + T]

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

        The rollout's sampler: the same draws and output layout as `generate` with those arguments
        (same seed, same tokens) through a lean KV-cache loop (`rlhf.models.sampling`), and nothing
        from a shipped generation_config can reshape the distribution.
        """
        _check_left_padded(attention_mask, "sample")
        self._activate(role)
        self._set_training(False)
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
            with warnings.catch_warnings():
                # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`: not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                if self._peft_model is None:
                    self._peft_model = get_peft_model(self._causal_lm, lora_config, adapter_name=name)
                else:
                    self._peft_model.add_adapter(name, lora_config)
        except ValueError as err:  # e.g. target modules absent from this architecture
            raise ModelError(f"cannot add LoRA adapter {name!r}: {err}") from None
        # get_peft_model activates its adapter and add_adapter may touch flags: restore our state
        self._after_adapter_change()

    def _after_adapter_change(self) -> None:
        """Restore the active role and our trainable flags after peft added or deleted an adapter,
        and collect the LoRA layers again (a new target module brings new ones)."""
        self._switch(None if isinstance(self._active, RowRoles) else self._active)
        layers = [m for m in self._causal_lm.modules() if isinstance(m, BaseTunerLayer)]
        fast = all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters") for m in layers)
        self._lora_layers = layers if fast else []  # another peft: its public (slower) switch
        self._training = None  # new LoRA modules (their dropout) start in train mode whatever the model's
        adapters = set(self._peft_model.peft_config) if self._peft_model is not None else set()
        self._row_mixable = {a for a in adapters if self._lora_layers and all(_plain_lora(m, a) for m in layers)}

    def _add_row_deltas(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on every LoRA layer, registered only while a RowRoles forward is active (see
        _activate). peft's own update is disabled (the layer returns its base output) and this adds each
        role's B(A(dropout(x))) * scaling to its rows, the arithmetic of peft's LoRA Linear."""
        rows = self._active
        convert = not torch.is_autocast_enabled()  # as peft: LoRA runs in its weights' dtype unless autocast
        # split, not slice: a slice's backward writes its gradient into a zero-filled full-size tensor,
        # split's backward concatenates the pieces
        sizes = [stop - start for _, start, stop in rows]
        parts = []
        for (role, _, _), x_rows, base in zip(rows, args[0].split(sizes), output.split(sizes)):
            if role not in getattr(layer, "lora_A", {}):  # this adapter does not target this module
                parts.append(base)
                continue
            lora_A, lora_B = layer.lora_A[role], layer.lora_B[role]
            x_rows = x_rows.to(lora_A.weight.dtype) if convert else x_rows  # [rows, S, in]
            low_rank = lora_A(layer.lora_dropout[role](x_rows))  # [rows, S, r]
            # base + scaling * low_rank @ B^T as one GEMM: no separate full-width multiply and add
            part = torch.addmm(base.reshape(-1, base.shape[-1]).to(low_rank.dtype),
                               low_rank.reshape(-1, low_rank.shape[-1]), lora_B.weight.t(), alpha=layer.scaling[role])
            parts.append(part.view_as(base).to(output.dtype))  # [rows, S, out]
        return torch.cat(parts)

    def _load_adapter_weights(self, name: str, adapter_dir: Path) -> None:
        weights = load_peft_weights(str(adapter_dir), device=str(self.device))
        result = set_peft_model_state_dict(self._peft_model, weights, adapter_name=name)
        if result.unexpected_keys:
            raise ModelError(
                f"{adapter_dir}: {len(result.unexpected_keys)} adapter tensors do not fit this base, "
                f"e.g. {result.unexpected_keys[0]}"
            )
        # a partial file would leave the rest of the adapter at its fresh init without a word
        missing = [key for key in result.missing_keys if f".{name}." in key]
        if missing:
            raise ModelError(f"{adapter_dir}: {len(missing)} adapter tensors are missing, e.g. {missing[0]}")

    def _find_adapter_parameters(self, name: str) -> list[nn.Parameter]:
        parameters = []
        for module in self._peft_model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for layer_name in module.adapter_layer_names:  # lora_A, lora_B, lora_embedding_A, ...
                per_adapter = getattr(module, layer_name)
                if name not in per_adapter:
                    continue
                entry = per_adapter[name]
                parameters.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        assert parameters, f"adapter {name!r} has no parameters"
        return parameters

    def _apply_trainable_flags(self) -> None:
        for role in self._roles.values():
            for parameter in role.adapter_parameters:
                parameter.requires_grad_(role.trainable)
            if role.head is not None:
                role.head.requires_grad_(role.trainable)

    def _activate(self, role: str | None | RowRoles) -> None:
        if role == self._active:
            return
        if isinstance(role, RowRoles):
            for layer in self._lora_layers:
                layer._disable_adapters = True  # base output only: _add_row_deltas adds the roles' updates
            if not self._row_hooks:
                self._row_hooks = [layer.register_forward_hook(self._add_row_deltas) for layer in self._lora_layers]
            self._active = role
            return
        self._remove_row_hooks()
        if role is not None:
            self._role(role)
        if not self._lora_layers:
            self._switch(role)
            return
        # Set the two flags each LoRA layer's forward reads. peft's set_adapter walks every module of
        # the model and resets requires_grad, which _switch then restores: about 2 ms per switch on a
        # tiny model, a dozen switches per PPO iteration, for the same end state.
        for layer in self._lora_layers:
            layer._disable_adapters = role is None
            if role is not None:
                layer._active_adapter = [role]
        if role is not None:
            self._peft_model.base_model.active_adapter = role
        self._active = role

    def _set_training(self, training: bool) -> None:
        """Train mode while autograd records (LoRA dropout on), eval otherwise; only when it changes,
        since `train()` walks every module (about 1 ms per call on a tiny model)."""
        if self._training != training:
            self._causal_lm.train(training)
            self._training = training

    def _remove_row_hooks(self) -> None:
        for handle in self._row_hooks:
            handle.remove()
        self._row_hooks = []

    def _switch(self, role: str | None) -> None:
        """Make `role` the adapter in the forward (None: disable them all), then restore our flags."""
        self._remove_row_hooks()
        if self._peft_model is not None:
            tuner = self._peft_model.base_model
            if role is None:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                self._peft_model.set_adapter(role)
        self._active = role
        self._apply_trainable_flags()

    def _checkpoint_contexts(self):
        """torch.utils.checkpoint `context_fn`: run each layer's backward recompute with the role
        that was active during its forward."""
        return contextlib.nullcontext(), self.use(self._active)


class RowRoles(tuple):
    """((role, start, stop), ...): which role's adapter applies to which rows of one forward."""


def _plain_lora(layer: nn.Module, adapter: str) -> bool:
    """Whether `adapter` on this LoRA layer is output = base(x) + B(A(dropout(x))) * scaling (or absent),
    the only form _add_row_deltas computes."""
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return False  # an embedding's update, not a projection's
    if adapter not in getattr(layer, "lora_A", {}):
        return True  # not targeted here: the hook adds nothing for it
    return (not getattr(layer, "use_dora", {}).get(adapter, False)
            and adapter not in getattr(layer, "lora_variant", {})
            and getattr(layer.lora_B[adapter], "bias", None) is None)


def _check_left_padded(attention_mask: torch.Tensor, what: str) -> None:
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(f"{what} needs left-padded prompts: some rows end in padding")


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True, [B] (the last real token under right or left padding)."""
    mask = mask.to(torch.bool)  # [B, S]
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("a row of attention_mask has no real token")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # [B, S]
    return torch.where(mask, positions, -1).amax(dim=-1)  # [B]


def _read_lora_config(adapter_dir: Path) -> LoraConfig:
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

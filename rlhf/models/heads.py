"""Scalar heads: the linear layer that replaces the LM head for the reward model and the value function.

InstructGPT's RM is the SFT network with its unembedding replaced by a projection to one scalar;
the value function is initialised from the RM. Both are `ScalarHead`s over the final hidden state;
they differ only in which positions are read (the last real token for the reward, every token for
the value) and in their fresh initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf.errors import ModelError

HEAD_KINDS = ("reward", "value")
HEAD_FILE = "head.safetensors"


class ScalarHead(nn.Module):
    """score = linear(h) + offset, in fp32 whatever the base's dtype.

    `offset` is a buffer, not a parameter: the RM stage sets it once after training so the
    demonstrations score 0 on average (InstructGPT: "the RM's output is shifted so that the
    labellers' demonstrations score 0"), i.e. `offset = -mean(linear(h_demo))`. It travels with the
    head (saved, loaded, copied into the value head) but never receives gradients.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        self.register_buffer("offset", torch.zeros((), dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [..., H] in the base's compute dtype (bf16 on GPU); the head reads it in fp32
        return self.linear(hidden.float()).squeeze(-1) + self.offset  # [...]


def new_head(kind: str, hidden_size: int) -> ScalarHead:
    """A freshly initialised head of `kind` ("reward" or "value")."""
    if kind not in HEAD_KINDS:
        raise ModelError(f"head must be one of {', '.join(map(repr, HEAD_KINDS))} or None, got {kind!r}")
    head = ScalarHead(hidden_size)
    with torch.no_grad():
        if kind == "reward":
            # Stiennon et al. 2020 (p. 11), as lm-human-preferences: N(0, 1 / (H + 1)), bias 0,
            # so the untrained RM's scores have about unit variance
            head.linear.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1))
        else:
            # ours: a fresh value head predicts 0 everywhere; InstructGPT starts it from the RM
            # instead (RoleModel.add_role("value", adapter_dir=<the RM's directory>, head="value"))
            head.linear.weight.zero_()
        head.linear.bias.zero_()
    return head


def save_head(head: ScalarHead, path: str | Path) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "hidden_size": str(head.linear.in_features)})


def load_head_weights(head: ScalarHead, path: str | Path) -> None:
    """Fill `head` from a file written by `save_head`; a hidden-size mismatch is a ModelError."""
    tensors = load_file(str(path), device=str(head.offset.device))
    expected = {name: tuple(tensor.shape) for name, tensor in head.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if found != expected:
        raise ModelError(f"{path}: head tensors {found} do not fit this base (expected {expected})")
    head.load_state_dict(tensors)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True, [B] (the last real token under right or left padding).

    A row with no True gives 0: callers that can meet empty rows check `mask.any(dim=-1)` (the
    reward score refuses them; PPO's reward shaping adds nothing there).
    """
    mask = mask.to(torch.bool)  # [B, S]
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # [B, S]
    return torch.where(mask, positions, 0).amax(dim=-1)  # [B]

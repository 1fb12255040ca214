"""The shared base and its roles: one frozen (4-bit) causal LM, LoRA adapters for policy,
reference, reward and value, scalar heads for reward and value. See docs/ARCHITECTURE.md."""

from rlhf.models.base import load_tokenizer
from rlhf.models.config import ModelConfig
from rlhf.models.heads import ScalarHead, last_true_index
from rlhf.models.roles import RoleModel

__all__ = ["ModelConfig", "RoleModel", "ScalarHead", "last_true_index", "load_tokenizer"]

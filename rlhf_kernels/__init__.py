"""Fused Triton kernels for the RLHF step's per-token math, with torch references beside them.

Every function returns fp32 (fp64 for fp64 inputs on the torch backend) and picks its backend per
call: `backend=None | "auto" | "triton" | "torch"`, default from the environment variable
RLHF_KERNELS_BACKEND (auto: CUDA tensors -> Triton, CPU -> the chunked torch references;
TRITON_INTERPRET=1 makes auto pick Triton on CPU too). Imports only torch, and triton if present.
"""

from .fused_linear import fused_linear_ppo_loss, fused_linear_token_logprobs
from .gae import gae, whiten
from .kl import kl_penalty
from .logprobs import token_logprobs
from .ppo_loss import ppo_policy_loss
from .value_loss import ppo_value_loss

__all__ = [
    "token_logprobs",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "fused_linear_token_logprobs",
    "fused_linear_ppo_loss",
    "gae",
    "whiten",
]

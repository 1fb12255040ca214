"""The shared base and its roles: one frozen (4-bit) causal LM, LoRA adapters for policy,
reference, reward and value, scalar heads for reward and value. See docs/ARCHITECTURE.md.

The names below load on first use (PEP 562), so `import rlhf.models.config` (what `--help` reads)
does not import torch, transformers and peft."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rlhf.lazy_exports import lazy_exports

# bitsandbytes (imported by peft) warns on every CPU machine that an optional faster CPU kernel
# ("gemm_4bit_forward ... pip install kernels") is absent; nothing is wrong. Silenced here, before
# any submodule imports peft, so the CLI and the Python API both go without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_SOURCES = {
    "ModelConfig": "rlhf.models.config",
    "RoleModel": "rlhf.models.roles",
    "ScalarHead": "rlhf.models.heads",
    "last_true_index": "rlhf.models.heads",
    "load_tokenizer": "rlhf.models.base",
}
__all__ = sorted(_SOURCES)

if TYPE_CHECKING:
    from rlhf.models.base import load_tokenizer
    from rlhf.models.config import ModelConfig
    from rlhf.models.heads import ScalarHead, last_true_index
    from rlhf.models.roles import RoleModel


__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

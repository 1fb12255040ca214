"""The toy world: an offline, seeded instruction-following task, its data files, a gold labeller and
a pretrained tiny base model, so every stage runs end to end on CPU. See `rlhf.toy.world`.

The names below load on first use (PEP 562), so `import rlhf.toy.config` (what `--help` reads)
does not import torch and transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf.lazy_exports import lazy_exports

_SOURCES = {
    "Judgement": "rlhf.toy.labeller",
    "ToyConfig": "rlhf.toy.config",
    "ToyWorld": "rlhf.toy.write",
    "build_tokenizer": "rlhf.toy.tokenizer",
    "gold_score": "rlhf.toy.labeller",
    "judge": "rlhf.toy.labeller",
    "parse_prompt": "rlhf.toy.tasks",
    "rank": "rlhf.toy.labeller",
    "target_answer": "rlhf.toy.tasks",
    "write_toy_world": "rlhf.toy.write",
}
__all__ = sorted(_SOURCES)

if TYPE_CHECKING:
    from rlhf.toy.config import ToyConfig
    from rlhf.toy.labeller import Judgement, gold_score, judge, rank
    from rlhf.toy.tasks import parse_prompt, target_answer
    from rlhf.toy.tokenizer import build_tokenizer
    from rlhf.toy.write import ToyWorld, write_toy_world


__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

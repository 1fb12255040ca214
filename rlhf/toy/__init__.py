"""The toy world: an offline, seeded instruction-following task, its data files, a gold labeller and
a pretrained tiny base model, so every stage runs end to end on CPU. See `rlhf.toy.world`."""

from rlhf.toy.config import ToyConfig
from rlhf.toy.labeller import Judgement, gold_score, judge, rank
from rlhf.toy.tasks import parse_prompt, target_answer
from rlhf.toy.tokenizer import build_tokenizer
from rlhf.toy.write import ToyWorld, write_toy_world

__all__ = [
    "Judgement",
    "ToyConfig",
    "ToyWorld",
    "build_tokenizer",
    "gold_score",
    "judge",
    "parse_prompt",
    "rank",
    "target_answer",
    "write_toy_world",
]

"""Named gold judges: programs that score answers the way InstructGPT's labellers would, for the
tasks that have one. `rlhf pipeline` ranks the SFT policy's samples with a judge's `rank` (the RM's
labels) and `rlhf eval --gold NAME` scores held-out answers with its `gold_score`.

Each judge is a module with `gold_score(prompt, answer) -> float in [0, 1]` and
`rank(prompt, answers) -> [indices, best first]`; it loads on first use, so this file stays
torch-free (config validation reads `GOLD_JUDGES`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

GOLD_JUDGES = {
    "toy": "rlhf.toy.labeller",  # the toy world (rlhf toy)
    "instructions": "rlhf.tasks.instruction_judge",  # the instruction task (rlhf instructions)
}


def gold_judge(name: str) -> ModuleType:
    """The judge module named `name` (a key of GOLD_JUDGES)."""
    if name not in GOLD_JUDGES:
        raise KeyError(f"no gold judge named {name!r}; known: {', '.join(GOLD_JUDGES)}")
    return importlib.import_module(GOLD_JUDGES[name])

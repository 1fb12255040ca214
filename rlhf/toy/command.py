"""`rlhf toy --out DIR`: write the toy world where the command line asks for it."""

from __future__ import annotations

from rlhf.toy.config import ToyRunConfig  # noqa: F401  (re-exported; torch-free for `rlhf toy --help`)
from rlhf.toy.write import ToyWorld, write_toy_world


def write_toy_world_from_config(cfg: ToyRunConfig) -> ToyWorld:
    world = write_toy_world(cfg.out_dir, cfg.toy, overwrite=cfg.overwrite)
    print(f"toy world in {world.root}: sft={world.sft.name} rankings={world.rankings.name} "
          f"prompts={world.prompts.name} pretrain={world.pretrain.name} model={world.model}")
    return world

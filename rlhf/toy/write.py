"""`write_toy_world`: the entry point behind `rlhf toy --out DIR`.

DIR gets `sft.jsonl`, `rankings.jsonl`, `prompts.jsonl`, `pretrain.jsonl`, `split.json` (the one
train / tune / test split of the world's users that every stage reads), a pretrained tiny model
plus tokenizer in `model/`, `pretrain_metrics.jsonl`, and last `toy_world.json` (the config, record
counts and pretraining figures). Every file is written to a temporary name and renamed into place,
and `toy_world.json` only after all the rest, so a crash never leaves a world that looks complete.
"""

import dataclasses
import difflib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf.data.split import SPLIT_FILE, UserSplit
from rlhf.errors import ConfigError
from rlhf.toy.config import ToyConfig
from rlhf.toy.pretrain import pretrain_base
from rlhf.toy.tokenizer import build_tokenizer
from rlhf.toy.world import make_records

logger = logging.getLogger(__name__)

MANIFEST = "toy_world.json"
RECORD_FILES = {"sft": "sft.jsonl", "rankings": "rankings.jsonl", "prompts": "prompts.jsonl",
                "pretrain": "pretrain.jsonl"}
TUNE_FRACTION = 0.1  # ours: 6 of the default 60 users for choices (learning rate, ptx_coef) and validation
TEST_FRACTION = 0.1  # ours: 6 users (~100 RL prompts) only the reported evaluation sees


@dataclass(frozen=True)
class ToyWorld:
    """Where a written toy world's files are."""

    root: Path
    sft: Path  # {"prompt", "completion", "user_id"}
    rankings: Path  # {"prompt", "responses": [best, ..., worst], "user_id"}
    prompts: Path  # {"prompt", "user_id"}
    pretrain: Path  # {"text"}
    model: Path  # a Hugging Face model dir: LlamaForCausalLM + tokenizer
    split: Path  # split.json: the users of each part, "train" / "tune" / "test"

    @classmethod
    def at(cls, root: str | os.PathLike) -> "ToyWorld":
        root = Path(root)
        return cls(root=root, model=root / "model", split=root / SPLIT_FILE,
                   **{name: root / file for name, file in RECORD_FILES.items()})

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        """The world's `toy_world.json`: {"config", "counts", "pretrain": {loss_start, loss_end, ...}}."""
        return json.loads(self.manifest_path.read_text())

    def is_complete(self) -> bool:
        paths = [self.sft, self.rankings, self.prompts, self.pretrain, self.split, self.model / "config.json"]
        return self.manifest_path.is_file() and all(path.exists() for path in paths)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # open(), not mkstemp: normal permissions
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_jsonl(path: Path, records: list[dict]) -> None:
    _atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def _config_with(cfg: ToyConfig | None, overrides: dict) -> ToyConfig:
    """`cfg` (default `ToyConfig()`) with keyword overrides; unknown keys get a did-you-mean."""
    names = [field.name for field in dataclasses.fields(ToyConfig)]
    for key in overrides:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; fields: {', '.join(names)}"
            raise ConfigError(f"toy: unknown field {key!r}{hint}")
    cfg = dataclasses.replace(cfg or ToyConfig(), **overrides)
    cfg.validate()
    return cfg


def write_toy_world(
    out_dir: str | os.PathLike, cfg: ToyConfig | None = None, *, overwrite: bool = False, **overrides
) -> ToyWorld:
    """Write the toy world (data files + pretrained base model) into `out_dir`; return its paths.

    `cfg` defaults to `ToyConfig()`; keyword `overrides` replace its fields
    (`write_toy_world(d, seed=1)`, `write_toy_world(d, ToyConfig.quick())`). A complete world
    already in `out_dir` written with the same config is returned as is; one written with another
    config raises `ConfigError` unless `overwrite=True`, which rewrites everything.
    """
    cfg = _config_with(cfg, overrides)
    world = ToyWorld.at(out_dir)
    config_dict = dataclasses.asdict(cfg)
    if world.is_complete() and not overwrite:
        found = world.manifest()["config"]
        if found == config_dict:
            logger.info("toy world already complete in %s; not rewriting it", world.root)
            return world
        differ = ", ".join(f"{key}: {found.get(key)!r} there vs {value!r} asked"
                           for key, value in config_dict.items() if found.get(key) != value)
        raise ConfigError(f"{world.root} holds a toy world written with another config ({differ}); "
                          "pass overwrite=True (--overwrite) or choose another --out")
    world.root.mkdir(parents=True, exist_ok=True)
    world.manifest_path.unlink(missing_ok=True)  # from here until the end the world is incomplete

    records = make_records(cfg)
    for name, file in RECORD_FILES.items():
        _write_jsonl(world.root / file, records[name])
    users = {record["user_id"] for name in ("sft", "rankings", "prompts") for record in records[name]}
    UserSplit.for_users(users, cfg.seed, TUNE_FRACTION, TEST_FRACTION).write(world.split)
    logger.info("toy world: wrote %s to %s",
                ", ".join(f"{len(records[name])} {file}" for name, file in RECORD_FILES.items()), world.root)

    tokenizer = build_tokenizer(cfg.max_position_embeddings)
    metrics_path = world.root / "pretrain_metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    model, stats = pretrain_base([record["text"] for record in records["pretrain"]], tokenizer, cfg, metrics_path)
    staging = world.root / f".model.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed run with the same pid
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if world.model.exists():
            shutil.rmtree(world.model)
        os.replace(staging, world.model)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    manifest = {
        "config": config_dict,
        "counts": {name: len(records[name]) for name in RECORD_FILES},
        "vocab_size": len(tokenizer),
        "pretrain": dataclasses.asdict(stats),
    }
    _atomic_write_text(world.manifest_path, json.dumps(manifest, indent=2) + "\n")
    return world

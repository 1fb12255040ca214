"""The whole recipe from one config: SFT -> labelling -> RM -> PPO (and PPO-ptx) -> evaluation.

With no arguments it runs the toy world (written first into `<out>/toy` if missing). Every stage
writes its own run directory under `<out>` and a `DONE` marker when it finishes; a rerun skips the
finished stages and resumes an unfinished one from its newest checkpoint.

    <out>/toy/                 the toy world (data + pretrained base + split.json), when no data was given
    <out>/split.json           the train / tune / test users every stage reads (your data, no split given)
    <out>/sft/                 policy adapter (later the frozen reference)
    <out>/rm_rankings.jsonl    K SFT samples per RM prompt, ranked by the gold judge (`gold`, rlhf.judges)
    <out>/rm/                  reward adapter + head
    <out>/ppo/, <out>/ppo_ptx/ policy and value adapters
    <out>/eval.json            the evaluation table (test users), with gold_vs_kl.png beside it
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from rlhf import distributed
from rlhf.config import require_path, save_config, validate
from rlhf.data import SPLIT_FILE, UserSplit, load_records
from rlhf.eval import evaluate
from rlhf.judges import gold_judge
from rlhf.models import ModelConfig
from rlhf.pipeline_config import PipelineConfig, PipelineData  # noqa: F401  (re-exported)
from rlhf.ppo import train as train_ppo
from rlhf.reward import train as train_rm
from rlhf.sft import train as train_sft
from rlhf.stage_dirs import is_done
from rlhf.training import resolve_device
from rlhf.toy import write_toy_world

log = logging.getLogger("rlhf.pipeline")


def _model(cfg: PipelineConfig, stage_model: ModelConfig, path: Path) -> ModelConfig:
    return dataclasses.replace(stage_model, path=str(path), quantization=cfg.quantization)


def _split_file(cfg: PipelineConfig, out: Path, toy_split: Path | None, data_files: dict[str, Path]) -> Path:
    """The one split.json every stage reads: given, the toy world's, the data directory's own (a task
    such as `rlhf instructions` writes one), or written once for your data."""
    if cfg.split:
        return require_path(cfg.split, "split", "split file (split.json)")
    if toy_split is not None:
        return toy_split
    path = out / SPLIT_FILE
    task_split = Path(cfg.data.dir) / SPLIT_FILE if cfg.data.dir else None
    # a run that already wrote its own split keeps it, even if the data directory gains one later
    if not path.is_file() and task_split is not None and task_split.is_file():
        log.info("using the data directory's user split %s", task_split)
        return task_split
    if not path.is_file():  # written once: a rerun must not move users between parts
        users = {r.get("user_id") for kind, f in data_files.items() if f.is_file()
                 for r in load_records(f, kind, skip_invalid=True)}
        UserSplit.for_users(users, cfg.split_seed, cfg.tune_fraction, cfg.test_fraction).write(path)
        log.info("wrote the user split to %s", path)
    return path


def run(cfg: PipelineConfig) -> dict:
    """Run (or finish) every stage and return the evaluation result. Several processes
    (`rlhf/distributed.py`): every stage runs on all of them; rank 0 writes the shared files."""
    distributed.init()
    validate(cfg)
    out = Path(cfg.out_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "pipeline_config.yaml")
    device = str(resolve_device(cfg.device))  # each stage places its process on its own GPU
    if cfg.uses_toy():
        # returns at once when already complete; the others wait (within the distributed timeout)
        world = distributed.on_main(lambda: write_toy_world(out / "toy", cfg.toy), "writing the toy world")
        model_path, sft_data, rankings, prompts, pretrain = (world.model, world.sft, world.rankings,
                                                             world.prompts, world.pretrain)
    else:
        model_path, sft_data, prompts, pretrain = (Path(cfg.model_path), Path(cfg.data.sft),
                                                   Path(cfg.data.prompts), Path(cfg.data.pretrain))
        rankings = Path(cfg.data.rankings)
    split = distributed.on_main(lambda: _split_file(cfg, out, world.split if cfg.uses_toy() else None,
                                                    {"sft": sft_data, "rankings": rankings, "prompts": prompts}),
                                "writing the user split")

    sft_dir = out / "sft"
    if not is_done(sft_dir):
        train_sft(dataclasses.replace(
            cfg.sft, model=_model(cfg, cfg.sft.model, model_path), out_dir=str(sft_dir), resume="auto",
            device=device, data=dataclasses.replace(cfg.sft.data, path=str(sft_data), split=str(split),
                                                    use_chat_template=cfg.use_chat_template)))

    rm_data = rankings
    if cfg.rm_labels == "sampled":
        rm_data = out / "rm_rankings.jsonl"
        if not rm_data.exists():
            from rlhf.labelling import sample_rankings

            gold_score = gold_judge(cfg.gold_judge()).gold_score  # the gold judge labels, as InstructGPT's did
            sample_rankings(_model(cfg, cfg.rm.model, model_path), sft_dir, rankings, rm_data, gold_score, k=cfg.rm_k,
                            max_new_tokens=cfg.ppo.rollout.max_new_tokens, seed=cfg.rm.seed,
                            max_prompt_length=cfg.ppo.data.max_prompt_length, device=device,
                            use_chat_template=cfg.use_chat_template)
    rm_dir = out / "rm"
    if not is_done(rm_dir):
        train_rm(dataclasses.replace(
            cfg.rm, model=_model(cfg, cfg.rm.model, model_path), out_dir=str(rm_dir), sft_dir=str(sft_dir),
            resume="auto", device=device,
            data=dataclasses.replace(cfg.rm.data, path=str(rm_data), demonstrations=str(sft_data), split=str(split),
                                     use_chat_template=cfg.use_chat_template)))

    for variant in cfg.ppo_variants:
        run_dir = out / variant
        if is_done(run_dir):
            continue
        ptx_coef = cfg.ptx_coef if variant == "ppo_ptx" else 0.0
        train_ppo(dataclasses.replace(
            cfg.ppo, model=_model(cfg, cfg.ppo.model, model_path), out_dir=str(run_dir), sft_dir=str(sft_dir),
            rm_dir=str(rm_dir), ptx_coef=ptx_coef, resume="auto", device=device,
            data=dataclasses.replace(cfg.ppo.data, path=str(prompts), pretrain=str(pretrain), split=str(split),
                                     use_chat_template=cfg.use_chat_template)))

    return evaluate(dataclasses.replace(
        cfg.eval, model=_model(cfg, cfg.eval.model, model_path), out_dir=str(out), sft_dir=str(sft_dir),
        rm_dir=str(rm_dir), policies={v: str(out / v) for v in cfg.ppo_variants},
        gold=cfg.gold_judge(), device=device,
        max_new_tokens=cfg.ppo.rollout.max_new_tokens,
        data=dataclasses.replace(cfg.eval.data, path=str(prompts), pretrain=str(pretrain), split=str(split),
                                 use_chat_template=cfg.use_chat_template)))

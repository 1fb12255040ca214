"""Evaluate policies against the SFT policy on held-out prompts (users never seen in training).

For each policy (the SFT adapter first, then each PPO run's policy):
- rm_score: mean RM score of its sampled answers (the proxy it was optimised for);
- gold_score: mean score by a named gold judge (`--gold toy|instructions`, rlhf.judges), when one exists;
- win_rate_vs_sft: fraction of (prompt, sample) pairs where the gold labeller prefers its answer to
  SFT's answer drawn with the same seed (ties 1/2);
- kl_to_sft: mean over prompts of sum_t log pi(y_t) - log pi_SFT(y_t) on its own samples (k1, nats);
- pretrain_loss: mean next-token NLL on held-out pretraining text (the "alignment tax" ptx protects).
Answers are sampled at `temperature` with a fixed seed, the same prompts for every policy, and
`answers_per_prompt` of them per prompt: one sample per prompt leaves a few points of sampling noise
on ~100 prompts, larger than the effects being measured on the toy world.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from rlhf.config import save_config, validate
from rlhf.data import load_records, pad_left, pad_right, shift_labels, split_by_user, tokenize_pretrain, tokenize_prompts
from rlhf.errors import ConfigError
from rlhf.eval_config import EvalConfig, EvalData  # noqa: F401  (re-exported: `from rlhf.eval import EvalConfig`)
from rlhf.judges import gold_judge
from rlhf.models import RoleModel
from rlhf.ppo.rollout import answer_logprobs, sample
from rlhf.progress import progress
from rlhf.stage_dirs import adapter_dir
from rlhf.training import resolve_device, set_seed

log = logging.getLogger("rlhf.eval")


def _gold_judge(kind: str):
    """The named gold judge's `gold_score` (rlhf.judges), or None for "none"."""
    return None if kind == "none" else gold_judge(kind).gold_score


@torch.no_grad()
def _answers_and_scores(model: RoleModel, role: str, prompts: list[dict], cfg: EvalConfig) -> dict:
    """Sample one answer per prompt from `role`; score it with the RM and the SFT reference."""
    tokenizer = model.tokenizer
    texts, rm_scores, kls, lengths = [], [], [], []
    torch.manual_seed(cfg.seed)  # the same noise for every policy
    shown = "sft" if role == "reference" else role  # the SFT adapter is loaded as the reference role
    for start in progress(range(0, len(prompts), cfg.batch_size), desc=f"eval {shown} samples", unit="batch"):
        rows = prompts[start:start + cfg.batch_size]
        padded = pad_left([p["input_ids"] for p in rows], tokenizer.pad_token_id)
        rollout = sample(model, padded["input_ids"].to(model.device), padded["attention_mask"].to(model.device),
                         cfg.max_new_tokens, cfg.temperature, 1.0, role=role)
        logp = {name: answer_logprobs(model, name, rollout, cfg.temperature) for name in (role, "reference")}  # [b, T]
        kls.append(((logp[role] - logp["reference"]) * rollout.answer_mask).sum(dim=1))  # [b]
        rm_scores.append(model.reward_scores("reward", rollout.sequences, rollout.attention_mask).float())
        lengths.append(rollout.answer_mask.sum(dim=1).float())
        for answer, mask in zip(rollout.answers, rollout.answer_mask):
            texts.append(tokenizer.decode(answer[mask], skip_special_tokens=True).strip())
    return {"answers": texts, "rm_scores": torch.cat(rm_scores), "kl": torch.cat(kls), "lengths": torch.cat(lengths)}


@torch.no_grad()
def pretrain_loss(model: RoleModel, role: str, chunks: list[dict], batch_size: int) -> float:
    nll, tokens = 0.0, 0
    pad_id = model.tokenizer.pad_token_id
    shown = "sft" if role == "reference" else role
    for start in progress(range(0, len(chunks), batch_size), desc=f"eval {shown} pretrain loss", unit="batch"):
        padded = pad_right([c["input_ids"] for c in chunks[start:start + batch_size]], pad_id)
        labels = shift_labels(padded["input_ids"], padded["answer_mask"]).to(model.device)  # [b, S]
        logprobs = model.token_logprobs(role, padded["input_ids"].to(model.device),
                                        padded["attention_mask"].to(model.device), labels)  # [b, S]
        valid = labels != -100
        nll -= (logprobs * valid).sum().item()
        tokens += int(valid.sum())
    return nll / max(tokens, 1)


def format_table(result: dict) -> str:
    columns = ["rm_score", "gold_score", "win_rate_vs_sft", "kl_to_sft", "pretrain_loss", "answer_length"]
    lines = [f"{'policy':<10}" + "".join(f"{c:>17}" for c in columns)]
    for name, row in result["policies"].items():
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append(f"{'-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.4f}':>17}")
        lines.append(f"{name:<10}" + "".join(cells))
    lines.append(f"held-out prompts: {result['n_prompts']} (users not seen in training), "
                 f"{result.get('answers_per_prompt', 1)} sampled answers each")
    rows = result["policies"].values()
    if not any(row.get("gold_score") is not None for row in rows):
        lines.append("gold_score, win_rate_vs_sft: - (they need a gold judge: --gold toy, the toy world's; "
                     "your own data has none)")
    if not any(row.get("pretrain_loss") is not None for row in rows):
        lines.append("pretrain_loss: - (needs pretraining text: --pretrain pretrain.jsonl)")
    return "\n".join(lines)


def evaluate(cfg: EvalConfig) -> dict:
    """Print the comparison table and write `<out_dir>/eval.json`; returns the same dict."""
    validate(cfg)
    cfg.check_inputs()
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "eval_config.yaml")
    model = RoleModel(cfg.model, device=device)
    model.add_role("reference", adapter_dir=adapter_dir(cfg.sft_dir, "policy"))
    model.add_role("reward", adapter_dir=adapter_dir(cfg.rm_dir, "reward"), head="reward")

    records = load_records(cfg.data.path, "prompts", skip_invalid=cfg.data.skip_invalid)
    _, held_out = split_by_user(records, cfg.data.val_fraction, cfg.data.seed)
    prompts, _ = tokenize_prompts(held_out[:cfg.data.max_prompts], model.tokenizer, cfg.data.max_prompt_length,
                                  use_chat_template=cfg.data.use_chat_template)
    if not prompts:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} leaves no held-out prompts to evaluate")
    samples = prompts * cfg.answers_per_prompt  # sample i of every policy shares its prompt and seed stream
    chunks = []
    if cfg.data.pretrain:
        texts = load_records(cfg.data.pretrain, "pretrain", skip_invalid=cfg.data.skip_invalid)
        _, held_texts = split_by_user(texts, cfg.data.val_fraction, cfg.data.seed)
        chunks, _ = tokenize_pretrain(held_texts, model.tokenizer, cfg.data.max_pretrain_length)
        chunks = [c for c in chunks if len(c["input_ids"]) > 1][:cfg.data.max_pretrain_chunks]
    judge = _gold_judge(cfg.gold)

    results, gold = {}, {}
    for name, run in cfg.all_policies().items():
        role = "reference" if name == "sft" else name
        if name != "sft":
            model.add_role(role, adapter_dir=adapter_dir(run, "policy"))
        sampled = _answers_and_scores(model, role, samples, cfg)
        row = {"rm_score": sampled["rm_scores"].mean().item(), "kl_to_sft": sampled["kl"].mean().item(),
               "answer_length": sampled["lengths"].mean().item()}
        if judge is not None:
            gold[name] = [judge(p["prompt"], a) for p, a in zip(samples, sampled["answers"])]
            row["gold_score"] = sum(gold[name]) / len(gold[name])
        row["pretrain_loss"] = pretrain_loss(model, role, chunks, cfg.batch_size) if chunks else None
        row["examples"] = [{"prompt": p["prompt"], "answer": a} for p, a in zip(prompts[:5], sampled["answers"][:5])]
        results[name] = row
        log.info("eval %s: %s", name, {k: v for k, v in row.items() if k != "examples"})
    for name, row in results.items():
        if judge is not None and name != "sft":
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold[name], gold["sft"])]
            row["win_rate_vs_sft"] = sum(wins) / len(wins)
    result = {"policies": results, "n_prompts": len(prompts), "answers_per_prompt": cfg.answers_per_prompt,
              "win_rate_vs_sft": {n: r["win_rate_vs_sft"] for n, r in results.items() if "win_rate_vs_sft" in r}}
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    tmp.replace(out / "eval.json")
    print(format_table(result))
    return result

"""Stage 2: the reward model, the SFT network with a scalar head, trained on ranked answers.

InstructGPT (section 3.5, eq. 1): for a prompt x with K ranked answers, every one of the C(K, 2)
pairs (y_w ranked above y_l) is a comparison, and all pairs of one prompt form one batch element:

    loss = -1 / C(K, 2) * sum over pairs of log(sigmoid(r(x, y_w) - r(x, y_l) - margin))

Each answer is scored once (K forward rows, not K(K-1)); the pairs are formed from the K scores.
Training on all pairs of a prompt together, for one epoch, avoids the overfitting that shuffled
single pairs cause. After training the output is shifted (`head.offset`) so that the labellers'
demonstrations score 0 on average before RL. Optional, off by default: a margin, and the
centred-reward regulariser `center_coef * mean(r^2)` (Eisenstein et al. 2023; TRL
`center_rewards_coefficient`) that keeps scores near 0.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.data import collate_rankings, load_parts, load_records, pad_right, tokenize_rankings, tokenize_sft
from rlhf.data.order import shuffled_positions
from rlhf.errors import DataError
from rlhf.metrics import postfix
from rlhf.models import RoleModel
from rlhf.stage_dirs import adapter_dir
from rlhf.reward_config import RMConfig, RMData  # noqa: F401  (re-exported: `from rlhf.reward import RMConfig`)
from rlhf.progress import progress
from rlhf.rm_diagnostics import rm_stage_diagnostics
from rlhf.stage_run import StageRun
from rlhf.training import autocast, build_optimizer, cosine_schedule

log = logging.getLogger("rlhf.reward")


def ranking_loss(scores: torch.Tensor, prompt_index: torch.Tensor, rank: torch.Tensor,
                 margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's pairwise ranking loss over all C(K, 2) pairs of each prompt.

    scores [M] (one per answer), prompt_index [M] (which prompt), rank [M] (0 = best) -> (loss, accuracy),
    loss = mean over prompts of the mean over that prompt's pairs of -log sigmoid(r_w - r_l - margin);
    accuracy = the fraction of pairs where r_w > r_l.
    """
    scores = scores.float()
    same_prompt = prompt_index[:, None] == prompt_index[None, :]  # [M, M]
    pairs = same_prompt & (rank[:, None] < rank[None, :])  # [M, M] row w ranked above column l
    diff = scores[:, None] - scores[None, :]  # [M, M] r_w - r_l
    pair_loss = -F.logsigmoid(diff - margin)  # [M, M]
    pairs_per_prompt = torch.zeros(int(prompt_index.max()) + 1, device=scores.device)
    pairs_per_prompt.index_add_(0, prompt_index, pairs.sum(dim=1).float())  # [n_prompts]
    weight = pairs.float() / pairs_per_prompt[prompt_index].clamp(min=1)[:, None]  # [M, M] 1 / C(K, 2)
    n_prompts = (pairs_per_prompt > 0).sum().clamp(min=1)
    loss = (pair_loss * weight).sum() / n_prompts
    accuracy = ((diff > 0) & pairs).sum() / pairs.sum().clamp(min=1)
    return loss, accuracy


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def ranking_batch_loss(model: RoleModel, batch: dict[str, torch.Tensor], margin: float,
                       center_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every answer of the batch once and form the pairs from the scores. -> (loss, accuracy, scores)"""
    scores = model.reward_scores("reward", batch["input_ids"], batch["attention_mask"])  # [M]
    loss, accuracy = ranking_loss(scores, batch["prompt_index"], batch["rank"], margin)
    if center_coef > 0:
        loss = loss + center_coef * scores.float().pow(2).mean()
    return loss, accuracy, scores


@torch.no_grad()
def evaluate_rankings(model: RoleModel, examples: list[dict], batch_size: int, pad_id: int,
                      device: torch.device, precision: str, margin: float = 0.0) -> dict[str, float]:
    """Validation loss, pairwise accuracy (all C(K, 2) pairs) and the mean/std of the scores."""
    losses, correct, n_pairs, all_scores = [], 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = _to(collate_rankings(examples[start:start + batch_size], pad_id), device)
        with autocast(device, precision):
            loss, accuracy, scores = ranking_batch_loss(model, batch, margin, 0.0)
        sizes = torch.bincount(batch["prompt_index"])
        pairs = int((sizes * (sizes - 1) // 2).sum())
        losses.append(loss.item() * len(sizes))
        correct += accuracy.item() * pairs
        n_pairs += pairs
        all_scores.append(scores.float())
    scores = torch.cat(all_scores)
    return {"val_loss": sum(losses) / len(examples), "val_pairwise_accuracy": correct / max(n_pairs, 1),
            "val_score_mean": scores.mean().item(), "val_score_std": scores.std().item() if len(scores) > 1 else 0.0}


@torch.no_grad()
def demonstration_scores(model: RoleModel, examples: list[dict], batch_size: int, pad_id: int,
                         device: torch.device, precision: str) -> torch.Tensor:
    """RM scores of (prompt, demonstration) sequences. -> [n]"""
    scores = []
    for start in progress(range(0, len(examples), batch_size), desc="rm demonstration scores", unit="batch"):
        rows = examples[start:start + batch_size]
        padded = _to(pad_right([e["input_ids"] for e in rows], pad_id), device)
        with autocast(device, precision):
            scores.append(model.reward_scores("reward", padded["input_ids"], padded["attention_mask"]).float())
    return torch.cat(scores)


def normalise(model: RoleModel, cfg: RMConfig, rankings: list[dict]) -> dict[str, float]:
    """Shift the head so the demonstrations score 0 on average (InstructGPT, before RL)."""
    tokenizer = model.tokenizer
    if cfg.data.demonstrations:
        records = load_records(cfg.data.demonstrations, "sft", skip_invalid=cfg.data.skip_invalid)
        source = cfg.data.demonstrations
    else:  # no demonstrations given: the labellers' best answers stand in for them
        records = [{"prompt": r["prompt"], "completion": r["responses"][0], "source": r["source"],
                    "user_id": r.get("user_id")} for r in rankings]
        source = "the top-ranked responses"
    examples, _ = tokenize_sft(records, tokenizer, cfg.data.max_length, use_chat_template=cfg.data.use_chat_template)
    if not examples:
        raise DataError(f"no demonstrations left to normalise the reward model with ({source})")
    head = model.head("reward")
    device = head.offset.device
    with torch.no_grad():
        head.offset.zero_()
        raw = demonstration_scores(model, examples, cfg.micro_batch_size * 4, tokenizer.pad_token_id,
                                   device, cfg.precision)
        head.offset.fill_(-raw.mean())
    log.info("RM normalised on %d demonstrations from %s: offset %.4f", len(examples), source, -raw.mean().item())
    return {"demo_score_mean_before": raw.mean().item(), "demo_score_std": raw.std().item() if len(raw) > 1 else 0.0,
            "offset": head.offset.item(), "n_demonstrations": len(examples)}


def train(cfg: RMConfig) -> Path:
    """Train the reward adapter and head; returns the run dir (adapter + head in `<out>/reward`)."""
    with StageRun(cfg, "rm", "reward-model training", ["micro_batch_size", "data.max_length"]) as run:
        if run.finished:
            return run.out
        device = run.device
        train_records, val_records = load_parts(cfg.data.path, "rankings", ("train", "tune"), cfg.data.split,
                                                cfg.data.skip_invalid)  # the one user split (see sft.py)
        model = RoleModel(cfg.model, device=device)
        tokenizer = model.tokenizer
        kw = dict(use_chat_template=cfg.data.use_chat_template)
        train_examples, _ = tokenize_rankings(train_records, tokenizer, cfg.data.max_length, **kw)
        val_examples, _ = tokenize_rankings(val_records, tokenizer, cfg.data.max_length, **kw)
        if not train_examples:
            raise DataError(f"{cfg.data.path}: no rankings left after the split and truncation")
        log.info("RM: %d train / %d validation rankings", len(train_examples), len(val_examples))
        sft_policy = adapter_dir(cfg.sft_dir, "policy") if cfg.sft_dir else None  # the SFT network, new head
        model.add_role("reward", adapter_dir=run.resume_path("reward", fresh=sft_policy), trainable=True, head="reward")

        steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        params = model.parameters("reward")
        optimizer = build_optimizer(params, cfg.optim)
        scheduler = cosine_schedule(optimizer, total_steps, cfg.optim)
        running = torch.zeros(2, device=device)  # loss and accuracy summed since the last log line
        start = run.begin(model, ["reward"], optimizer, scheduler, running=running)
        pad_id = tokenizer.pad_token_id
        bar = progress(range(start, total_steps), initial=start, total=total_steps, desc="rm", unit="step")
        for step in bar:
            rows = shuffled_positions(len(train_examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)

            def forward_backward(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
                accumulation = math.ceil(len(rows) / micro)
                loss_sum = torch.zeros((), device=device)
                acc_sum = torch.zeros((), device=device)
                for i in range(0, len(rows), micro):
                    batch = _to(collate_rankings([train_examples[r] for r in rows[i:i + micro]], pad_id), device)
                    with autocast(device, cfg.precision):
                        loss, accuracy, _ = ranking_batch_loss(model, batch, cfg.margin, cfg.center_coef)
                        loss = loss / accumulation
                    loss.backward()
                    loss_sum += loss.detach().float()
                    acc_sum += accuracy.detach() / accumulation
                return loss_sum, acc_sum

            loss_sum, acc_sum = run.halver.run(forward_backward, optimizer)
            grad_norm = run.optimizer_step(params, loss_sum, step,
                                           f"rankings {[train_examples[r]['source'] for r in rows[:4]]}...")
            running += torch.stack([loss_sum, acc_sum])
            done = step + 1
            row = {}
            if done % cfg.log_every == 0 or done == total_steps:
                n = done % cfg.log_every or cfg.log_every
                row.update(train_loss=running[0] / n, train_pairwise_accuracy=running[1] / n,
                           lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, skipped_steps=run.guard.skipped_total)
                running.zero_()
            if val_examples and (done % cfg.eval_every == 0 or done == total_steps):
                row.update(evaluate_rankings(model, val_examples, cfg.micro_batch_size, pad_id, device, cfg.precision,
                                             cfg.margin))
            if row:
                logged = run.metrics.log(done, row)
                bar.set_postfix(postfix(logged, ("train_loss", "val_pairwise_accuracy")))
            run.step_done(done, total_steps)
        summary = normalise(model, cfg, train_records)
        if val_examples:
            summary.update(evaluate_rankings(model, val_examples, cfg.micro_batch_size, pad_id, device, cfg.precision,
                                             cfg.margin))
            # is the RM more than a length rule? (issue 15.3) RM vs length rule vs SFT log-prob on the same pairs
            summary.update(rm_stage_diagnostics(model, val_examples, cfg.sft_dir, cfg.micro_batch_size, device,
                                                cfg.precision))
        run.metrics.log(total_steps, {k: v for k, v in summary.items()
                                      if k.startswith(("val_", "offset", "demo_")) and not isinstance(v, str)})
        run.finish(steps=total_steps, **summary)
    log.info("RM done: %s", summary)
    return run.out

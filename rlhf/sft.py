"""Stage 1: supervised fine-tuning of the `policy` adapter on demonstrations (loss on answer tokens).

InstructGPT (appendix C.1): 16 epochs, cosine decay to 10% of the peak rate, residual dropout 0.2.
The validation loss starts rising after about one epoch; the paper keeps training because the later
RM score still improves. The adapter saved in `<out>/policy` is what PPO later loads twice: as the
trainable policy and as the frozen reference.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rlhf.data import load_parts, pad_right, shift_labels, tokenize_sft
from rlhf.data.order import shuffled_positions
from rlhf.errors import DataError
from rlhf.metrics import postfix
from rlhf.models import RoleModel
from rlhf.sft_config import SFTConfig, SFTData  # noqa: F401  (re-exported: `from rlhf.sft import SFTConfig`)
from rlhf.progress import progress
from rlhf.stage_run import StageRun
from rlhf.training import autocast, build_optimizer, cosine_schedule

log = logging.getLogger("rlhf.sft")


def _batch(examples: list[dict], rows: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    padded = pad_right([examples[i]["input_ids"] for i in rows], pad_id, [examples[i]["answer_mask"] for i in rows])
    labels = shift_labels(padded["input_ids"], padded["answer_mask"])  # [b, S]
    return {"input_ids": padded["input_ids"].to(device), "attention_mask": padded["attention_mask"].to(device),
            "labels": labels.to(device)}


def answer_nll_sum(model: RoleModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over answer tokens, number of answer tokens) for one batch."""
    logprobs = model.token_logprobs("policy", batch["input_ids"], batch["attention_mask"], batch["labels"])  # [b, S]
    valid = batch["labels"] != -100  # [b, S]
    return -(logprobs * valid).sum(), valid.sum()


@torch.no_grad()
def evaluate_loss(model: RoleModel, examples: list[dict], batch_size: int, pad_id: int, device: torch.device,
                  precision: str) -> dict[str, float]:
    """Token-mean answer NLL and perplexity over `examples`."""
    nll, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(examples), batch_size):
        batch = _batch(examples, list(range(start, min(start + batch_size, len(examples)))), pad_id, device)
        with autocast(device, precision):
            part_nll, part_tokens = answer_nll_sum(model, batch)
        nll += part_nll.float()
        tokens += part_tokens
    loss = (nll / tokens.clamp(min=1)).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def train(cfg: SFTConfig) -> Path:
    """Fine-tune the policy adapter on demonstrations; returns the run dir (adapter in `<out>/policy`)."""
    with StageRun(cfg, "sft", "SFT training", ["micro_batch_size", "data.max_length"]) as run:
        if run.finished:
            return run.out
        device = run.device
        # the one user split of every stage: train users to train, tune users for the validation curve
        train_records, val_records = load_parts(cfg.data.path, "sft", ("train", "tune"), cfg.data.split,
                                                cfg.data.skip_invalid)
        model = RoleModel(cfg.model, device=device)
        tokenizer = model.tokenizer
        train_examples, _ = tokenize_sft(train_records, tokenizer, cfg.data.max_length,
                                         use_chat_template=cfg.data.use_chat_template)
        val_examples, _ = tokenize_sft(val_records, tokenizer, cfg.data.max_length,
                                       use_chat_template=cfg.data.use_chat_template)
        if not train_examples:
            raise DataError(f"{cfg.data.path}: no training examples left after the split and truncation")
        log.info("SFT: %d train / %d validation demonstrations", len(train_examples), len(val_examples))
        model.add_role("policy", adapter_dir=run.resume_path("policy", fresh=None), trainable=True)

        steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        params = model.parameters("policy")
        optimizer = build_optimizer(params, cfg.optim)
        scheduler = cosine_schedule(optimizer, total_steps, cfg.optim)
        # the loss summed since the last log line; checkpointed so a resumed run logs the same means
        running = torch.zeros((), device=device)
        start = run.begin(model, ["policy"], optimizer, scheduler, running_loss=running)
        pad_id = tokenizer.pad_token_id
        bar = progress(range(start, total_steps), initial=start, total=total_steps, desc="sft", unit="step")
        for step in bar:
            # each step's rows depend only on (seed, step): a resumed run sees the same batches
            rows = shuffled_positions(len(train_examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)

            def forward_backward(micro: int) -> torch.Tensor:
                micro_batches = [_batch(train_examples, rows[i:i + micro], pad_id, device)
                                 for i in range(0, len(rows), micro)]
                total_tokens = sum((mb["labels"] != -100).sum() for mb in micro_batches).clamp(min=1)
                loss_sum = torch.zeros((), device=device)
                for mb in micro_batches:
                    with autocast(device, cfg.precision):
                        nll, _ = answer_nll_sum(model, mb)
                        loss = nll / total_tokens  # token mean over the whole batch, not per micro-batch
                    loss.backward()
                    loss_sum += loss.detach().float()
                return loss_sum

            loss_sum = run.halver.run(forward_backward, optimizer)
            grad_norm = run.optimizer_step(params, loss_sum, step,
                                           f"rows {[train_examples[i]['source'] for i in rows[:4]]}...")
            running += loss_sum
            done = step + 1
            row = {}
            if done % cfg.log_every == 0 or done == total_steps:
                n = done % cfg.log_every or cfg.log_every
                row.update(train_loss=running / n, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                           epoch=done / steps_per_epoch, skipped_steps=run.guard.skipped_total)
                running.zero_()
            if val_examples and (done % cfg.eval_every == 0 or done % steps_per_epoch == 0 or done == total_steps):
                row.update(evaluate_loss(model, val_examples, cfg.micro_batch_size, pad_id, device, cfg.precision))
            if row:
                logged = run.metrics.log(done, row)
                bar.set_postfix(postfix(logged, ("train_loss", "val_loss")))
            run.step_done(done, total_steps)
        final = evaluate_loss(model, val_examples, cfg.micro_batch_size, pad_id, device, cfg.precision) if val_examples else {}
        run.finish(steps=total_steps, **final)
    log.info("SFT done: adapter in %s %s", run.out / "policy", final)
    return run.out

"""Stage 1: supervised fine-tuning of the `policy` adapter on demonstrations (loss on answer tokens).

InstructGPT (appendix C.1): 16 epochs, cosine decay to 10% of the peak rate, residual dropout 0.2.
The validation loss starts rising after about one epoch; the paper keeps training because the later
RM score still improves. The adapter saved in `<out>/policy` is what PPO later loads twice: as the
trainable policy and as the frozen reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import (load_trainer_state, resolve_resume, rng_state, save_checkpoint,
                             save_trainer_state, set_rng_state)
from rlhf.config import ChatTemplateSetting, require_model_source, require_path, save_config, validate
from rlhf.data import load_records, pad_right, shift_labels, split_by_user, tokenize_sft
from rlhf.data.order import shuffled_positions
from rlhf.errors import ConfigError, DataError
from rlhf.metrics import MetricsLogger, postfix
from rlhf.models import ModelConfig, RoleModel
from rlhf.stage_dirs import mark_done
from rlhf.training import (NonFiniteError, NonFiniteGuard, OptimConfig, autocast, build_optimizer,
                           MicroBatchHalver, cosine_schedule, resolve_device, set_seed)

log = logging.getLogger("rlhf.sft")


@dataclass
class SFTData:
    path: str = ""  # demonstrations: {"prompt", "completion"} or {"messages"} records
    val_fraction: float = 0.1  # ours: held-out users (split by user id, as InstructGPT splits)
    max_length: int = 64  # ours: toy sequences are < 40 tokens; longer prompts are cut from the left
    use_chat_template: ChatTemplateSetting = "auto"  # ours: the model's own chat format whenever it has one; one
    # value for every stage, so the policy is trained and scored on the text it sees at rollout time
    skip_invalid: bool = False  # ours: fail on bad records unless asked to skip and count them
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora_dropout=0.2))
    # InstructGPT SFT: residual dropout 0.2 (here on the LoRA branch; PPO runs with dropout off)
    data: SFTData = field(default_factory=SFTData)
    out_dir: str = "runs/sft"
    epochs: int = 16  # InstructGPT SFT: 16 epochs; overfits after 1, the RM score still improves
    batch_size: int = 32  # ours: sequences per optimiser step
    micro_batch_size: int = 32  # ours: sequences per forward; accumulation = batch / micro
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=20, min_lr_ratio=0.1))
    # lr ours (LoRA on a tiny model); min_lr_ratio 0.1: InstructGPT cosine decay to 10%
    eval_every: int = 100  # ours: optimiser steps between validation passes (and at each epoch's end)
    log_every: int = 10  # ours
    checkpoint_every: int = 200  # ours: optimiser steps between checkpoints
    keep_last: int = 2  # ours
    resume: str = ""  # "" fresh, "auto" newest complete checkpoint in out_dir, or a checkpoint path
    max_nonfinite_in_a_row: int = 3  # ours
    auto_halve_micro_batch: bool = False  # ours: on out-of-memory, halve micro_batch_size and retry the step
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA; fp32 on CPU

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        if min(self.eval_every, self.log_every, self.checkpoint_every, self.keep_last) < 1:
            raise ConfigError("eval_every, log_every, checkpoint_every and keep_last must be >= 1")

    def check_inputs(self) -> None:
        """The paths this run reads exist (before any model loads)."""
        require_model_source(self.model.path, "model.path")
        require_path(self.data.path, "data.path", "demonstrations file (--data sft.jsonl)")


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
    validate(cfg)
    cfg.check_inputs()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = resolve_resume(out, cfg.resume, cfg)  # before config.yaml is replaced
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)

    records = load_records(cfg.data.path, "sft", skip_invalid=cfg.data.skip_invalid)
    train_records, val_records = split_by_user(records, cfg.data.val_fraction, cfg.data.seed)
    model = RoleModel(cfg.model, device=device)
    tokenizer = model.tokenizer
    train_examples, _ = tokenize_sft(train_records, tokenizer, cfg.data.max_length,
                                     use_chat_template=cfg.data.use_chat_template)
    val_examples, _ = tokenize_sft(val_records, tokenizer, cfg.data.max_length,
                                   use_chat_template=cfg.data.use_chat_template)
    if not train_examples:
        raise DataError(f"{cfg.data.path}: no training examples left after the split and truncation")
    log.info("SFT: %d train / %d validation demonstrations", len(train_examples), len(val_examples))
    model.add_role("policy", adapter_dir=resume_from / "policy" if resume_from else None, trainable=True)

    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    params = model.parameters("policy")
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = cosine_schedule(optimizer, total_steps, cfg.optim)
    guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)
    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        start = state["step"]
        log.info("resumed from %s at step %d", resume_from, start)
    metrics = MetricsLogger(out, "sft", resume_step=start if resume_from else None)
    pad_id = tokenizer.pad_token_id
    # the loss summed since the last log line; checkpointed so a resumed run logs the same means
    running = torch.tensor(state["running_loss"] if resume_from else 0.0, device=device)

    def checkpoint(step: int) -> None:
        def write(directory: Path) -> None:
            model.save_role("policy", directory / "policy")
            save_trainer_state(directory, {"step": step, "optimizer": optimizer.state_dict(),
                                           "scheduler": scheduler.state_dict(), "guard": guard.state_dict(),
                                           "running_loss": running.item(), "rng": rng_state()})
        save_checkpoint(out, step, write, keep_last=cfg.keep_last, config=cfg)

    halver = MicroBatchHalver(cfg.micro_batch_size, cfg.auto_halve_micro_batch, "SFT training",
                              ["micro_batch_size", "data.max_length"])
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="sft", unit="step")
    for step in bar:
        # each step's rows depend only on (seed, step): a resumed run sees the same batches
        rows = shuffled_positions(len(train_examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)
        optimizer.zero_grad(set_to_none=True)

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

        loss_sum = halver.run(forward_backward, optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        try:
            if guard.ok(loss_sum, grad_norm, step, f"rows {[train_examples[i]['source'] for i in rows[:4]]}..."):
                optimizer.step()
        except NonFiniteError:
            checkpoint(step)  # the weights are still the last good ones: bad steps were skipped
            raise
        scheduler.step()
        running += loss_sum
        done = step + 1
        row = {}
        if done % cfg.log_every == 0 or done == total_steps:
            n = done % cfg.log_every or cfg.log_every
            row.update(train_loss=running / n, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                       epoch=done / steps_per_epoch, skipped_steps=guard.skipped_total)
            running.zero_()
        if val_examples and (done % cfg.eval_every == 0 or done % steps_per_epoch == 0 or done == total_steps):
            row.update(evaluate_loss(model, val_examples, cfg.micro_batch_size, pad_id, device, cfg.precision))
        if row:
            logged = metrics.log(done, row)
            bar.set_postfix(postfix(logged, ("train_loss", "val_loss")))
        if done % cfg.checkpoint_every == 0 or done == total_steps:
            checkpoint(done)
    metrics.close()
    model.save_role("policy", out / "policy")
    final = evaluate_loss(model, val_examples, cfg.micro_batch_size, pad_id, device, cfg.precision) if val_examples else {}
    mark_done(out, steps=total_steps, **final)
    log.info("SFT done: adapter in %s %s", out / "policy", final)
    return out

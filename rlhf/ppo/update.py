"""Step 5 of a PPO iteration: several epochs over shuffled mini-batches of one rollout batch.

Per mini-batch (gradient accumulated over micro-batches):

    loss = pg_loss + vf_coef * v_loss + ptx_coef * ptx_loss

- pg_loss: the clipped surrogate, masked mean over answer tokens of
  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - old_logp)
  (`rlhf_kernels.fused_linear_ppo_loss`: the LM head and the loss chunk by chunk, no [N, V] tensor);
- v_loss: the clipped value loss of openai baselines / TRL (`rlhf_kernels.ppo_value_loss`);
- ptx_loss: minus the mean log-likelihood of a pretraining batch (InstructGPT PPO-ptx, gamma).

The policy and value forwards of a micro-batch, and its share of the pretraining rows, run as one
forward over the shared base (`RoleModel.hidden_states_of_parts`).

Each epoch reshuffles the rollout into new mini-batches (MISSION; cleanrl `ppo.py` detail 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf import distributed
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.kl_controller import KLController
from rlhf.ppo.rollout import Rollout, answer_labels, answer_slice
from rlhf.training import MicroBatchHalver, NonFiniteGuard, autocast
from rlhf_kernels import fused_linear_ppo_loss, fused_linear_token_logprobs, ppo_value_loss


# the statistics of one optimiser step (micro_batch_losses' stats, pg_loss, value_loss)
UPDATE_STATS = ("clip_frac", "approx_kl", "entropy", "value_clip_frac", "pg_loss", "value_loss")


@dataclass
class Trainer:
    """What one PPO iteration updates besides the model."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    kl_ctl: KLController
    guard: NonFiniteGuard
    generator: torch.Generator  # mini-batch shuffles
    ptx_batches: object | None  # PretrainBatches (PPO-ptx), or None
    halver: MicroBatchHalver  # the micro-batch size of scoring and the update (halved on OOM if asked)


def micro_batch_losses(model, mb: Rollout, cfg: PPOConfig, ptx: dict[str, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """-> (pg_loss, v_loss, ptx_nll, stats) for one micro-batch. pg_loss and v_loss are token means over
    the answer mask; ptx_nll is the summed NLL of `ptx`'s labelled tokens (None without ptx rows), so
    that micro-batches add up to the mini-batch's sum.

    One forward runs the rollout rows through the policy and the value roles and the pretraining rows
    through the policy (`RoleModel.hidden_states_of_parts`)."""
    parts = [("policy", mb.sequences, mb.attention_mask), ("value", mb.sequences, mb.attention_mask)]
    if ptx is not None:
        parts.append(("policy", ptx["input_ids"], ptx["attention_mask"]))
    hidden_states = model.hidden_states_of_parts(parts)
    hidden = answer_slice(hidden_states[0], mb)  # [b, T, H]
    pg_loss, pg_stats = fused_linear_ppo_loss(
        hidden.reshape(-1, hidden.shape[-1]), model.lm_head_weight, answer_labels(mb).reshape(-1),
        mb.logprobs.reshape(-1), mb.advantages.reshape(-1), mb.answer_mask.reshape(-1),
        bias=model.lm_head_bias, clip_eps=cfg.clip_eps, temperature=cfg.rollout.temperature,
        **model.logit_transform)
    values = model.head("value")(answer_slice(hidden_states[1], mb))  # [b, T]
    v_loss, v_stats = ppo_value_loss(values.float(), mb.values, mb.returns, mb.answer_mask,
                                     clip_eps=cfg.value_clip_eps)
    stats = {"clip_frac": pg_stats["clip_frac"], "approx_kl": pg_stats["approx_kl"],
             "entropy": pg_stats["entropy"], "value_clip_frac": v_stats["clip_frac"]}
    ptx_nll = ptx_nll_sum(model, hidden_states[2], ptx["labels"]) if ptx is not None else None
    return pg_loss, v_loss, ptx_nll, stats


def ptx_nll_sum(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-sum of log pi(x_t | x_<t) over the labelled tokens of pretraining rows, from the policy's
    hidden states [b, L, H] and the shifted labels [b, L] (-100: not predicted). Sampling temperature
    plays no part: this is the pretraining likelihood itself."""
    logprobs = fused_linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head_weight,
                                           labels.reshape(-1), bias=model.lm_head_bias,
                                           **model.logit_transform)  # [b * L], 0 at -100
    return -logprobs.sum()


def _ptx_share(batch: dict[str, torch.Tensor] | None, index: int, parts: int) -> dict[str, torch.Tensor] | None:
    """The `index`-th of `parts` near-equal row slices of the mini-batch's pretraining rows (None if empty)."""
    if batch is None:
        return None
    rows = batch["input_ids"].shape[0]
    start, stop = rows * index // parts, rows * (index + 1) // parts
    return {key: value[start:stop] for key, value in batch.items()} if stop > start else None


def mini_batch_backward(model, rollout: Rollout, mini: torch.Tensor, cfg: PPOConfig, micro: int,
                        ptx: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Add the gradient of one mini-batch to the parameters' `.grad`, micro-batch by micro-batch of `micro`
    rows. -> (loss, stats)

    The mini-batch's pretraining rows (`ptx`, PPO-ptx) are shared out over the micro-batches; their loss
    is the NLL summed per micro-batch and divided by the mini-batch's token count, so the total is
    exactly the mean over all of them whatever the split."""
    device = rollout.sequences.device
    accumulation = len(mini) // micro
    step_stats: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device)
    ptx_tokens = (ptx["labels"] != -100).sum().clamp(min=1) if ptx is not None else None
    ptx_total = torch.zeros((), device=device)
    for index, micro_start in enumerate(range(0, len(mini), micro)):
        if not distributed.mine(index):  # several processes: micro-batches dealt round-robin over them
            continue
        mb = rollout.select(mini[micro_start:micro_start + micro])
        with autocast(device, cfg.precision):
            pg_loss, v_loss, ptx_nll, stats = micro_batch_losses(model, mb, cfg, _ptx_share(ptx, index, accumulation))
            loss = (pg_loss + cfg.vf_coef * v_loss) / accumulation
            if ptx_nll is not None:
                ptx_part = ptx_nll / ptx_tokens
                loss = loss + cfg.ptx_coef * ptx_part
                ptx_total += ptx_part.detach().float()
        loss.backward()
        loss_sum += loss.detach()
        stats.update(pg_loss=pg_loss.detach(), value_loss=v_loss.detach())
        for key, value in stats.items():
            step_stats[key] = step_stats.get(key, 0.0) + value.detach().float() / accumulation
    if ptx is not None:
        step_stats["ptx_loss"] = ptx_total
    return loss_sum, step_stats


def _summed_over_processes(loss_sum: torch.Tensor, step_stats: dict[str, torch.Tensor], with_ptx: bool
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Several processes: the mini-batch's loss and means are the sums of every process's share (a process
    dealt no micro-batch adds zeros). One process: as given."""
    if not distributed.active():
        return loss_sum, step_stats
    names = UPDATE_STATS + (("ptx_loss",) if with_ptx else ())
    zero = torch.zeros((), device=loss_sum.device)
    sums = distributed.all_sums(loss_sum, *(step_stats.get(name, zero) for name in names))
    return sums[0], dict(zip(names, sums[1:]))


def ppo_epochs(cfg: PPOConfig, model, rollout: Rollout, trainer: Trainer, iteration: int) -> dict[str, torch.Tensor]:
    """Run `cfg.ppo_epochs` passes over `rollout`; returns the mean of each statistic (tensors, no sync).
    Micro-batches have `trainer.halver.micro_batch_size` rows; an out-of-memory halves it (when enabled)
    and redoes the mini-batch: the same rows, so the same update."""
    B = rollout.sequences.shape[0]
    device = rollout.sequences.device
    totals: dict[str, torch.Tensor] = {}
    n_updates = 0
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=trainer.generator).to(device)  # a fresh shuffle every epoch
        for start in range(0, B, cfg.mini_batch_size):
            mini = order[start:start + cfg.mini_batch_size]
            ptx = trainer.ptx_batches.next() if cfg.ptx_coef > 0 else None  # drawn once: a retry reuses the rows
            for attempt in trainer.halver.attempts(trainer.optimizer):  # after an OOM: again, at half the size
                with attempt:
                    loss_sum, step_stats = mini_batch_backward(model, rollout, mini, cfg, attempt.micro_batch_size,
                                                               ptx)
            loss_sum, step_stats = _summed_over_processes(loss_sum, step_stats, ptx is not None)
            distributed.all_reduce_grads(trainer.params)  # several processes: the mini-batch's gradient
            grad_norm = trainer.guard.clip_and_step(trainer.optimizer, trainer.params, cfg.optim.max_grad_norm,
                                                    loss_sum, iteration,
                                                    f"iteration {iteration} epoch {epoch} rows {mini.tolist()}")
            trainer.optimizer.zero_grad(set_to_none=True)
            step_stats["grad_norm"] = grad_norm.detach().float()
            for key, value in step_stats.items():
                totals[key] = totals.get(key, 0.0) + value
            n_updates += 1
    trainer.scheduler.step()
    return {key: value / n_updates for key, value in totals.items()}

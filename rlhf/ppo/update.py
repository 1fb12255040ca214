"""Step 5 of a PPO iteration: several epochs over shuffled mini-batches of one rollout batch.

Per mini-batch (gradient accumulated over micro-batches):

    loss = pg_loss + vf_coef * v_loss + ptx_coef * ptx_loss

- pg_loss: the clipped surrogate, masked mean over answer tokens of
  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - old_logp)
  (`rlhf_kernels.fused_linear_ppo_loss`: the LM head and the loss chunk by chunk, no [N, V] tensor);
- v_loss: the clipped value loss of openai baselines / TRL (`rlhf_kernels.ppo_value_loss`);
- ptx_loss: minus the mean log-likelihood of a pretraining batch (InstructGPT PPO-ptx, gamma).

Each epoch reshuffles the rollout into new mini-batches (MISSION; cleanrl `ppo.py` detail 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.ppo.rollout import Rollout, answer_labels
from rlhf.training import MicroBatchHalver, NonFiniteGuard, autocast
from rlhf_kernels import fused_linear_ppo_loss, ppo_value_loss


@dataclass
class UpdateSettings:
    ppo_epochs: int
    mini_batch_size: int
    clip_eps: float
    value_clip_eps: float
    vf_coef: float
    ptx_coef: float
    temperature: float
    max_grad_norm: float
    precision: str


def micro_batch_losses(model, mb: Rollout, s: UpdateSettings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """-> (pg_loss, v_loss, stats) for one micro-batch; both losses are token means over the answer mask."""
    P, T = mb.prompt_len, mb.answer_mask.shape[1]
    # policy and value over the same rows in one forward; positions P-1 .. S-2 predict the answer
    policy_hidden, value_hidden = model.hidden_states_of_roles(("policy", "value"), mb.sequences, mb.attention_mask)
    hidden = policy_hidden[:, P - 1:P + T - 1]  # [b, T, H]
    pg_loss, pg_stats = fused_linear_ppo_loss(
        hidden.reshape(-1, hidden.shape[-1]), model.lm_head_weight, answer_labels(mb).reshape(-1),
        mb.logprobs.reshape(-1), mb.advantages.reshape(-1), mb.answer_mask.reshape(-1),
        bias=model.lm_head_bias, clip_eps=s.clip_eps, temperature=s.temperature)
    values = model.head("value")(value_hidden[:, P - 1:P + T - 1])  # [b, T]
    v_loss, v_stats = ppo_value_loss(values.float(), mb.values, mb.returns, mb.answer_mask,
                                     clip_eps=s.value_clip_eps)
    stats = {"clip_frac": pg_stats["clip_frac"], "approx_kl": pg_stats["approx_kl"],
             "entropy": pg_stats["entropy"], "value_clip_frac": v_stats["clip_frac"]}
    return pg_loss, v_loss, stats


def ptx_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """-mean log pi(x) over the pretraining tokens of `batch` (input_ids, attention_mask, labels)."""
    logprobs = model.token_logprobs("policy", batch["input_ids"], batch["attention_mask"], batch["labels"])  # [b, S]
    valid = batch["labels"] != -100  # [b, S]
    return -(logprobs * valid).sum() / valid.sum().clamp(min=1)


def _mini_batch_backward(model, rollout: Rollout, mini: torch.Tensor, optimizer, s: UpdateSettings,
                         micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the gradient of one mini-batch over micro-batches of `micro` rows. -> (loss, stats)"""
    optimizer.zero_grad(set_to_none=True)
    device = rollout.sequences.device
    accumulation = len(mini) // micro
    step_stats: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device)
    for micro_start in range(0, len(mini), micro):
        mb = rollout.select(mini[micro_start:micro_start + micro])
        with autocast(device, s.precision):
            pg_loss, v_loss, stats = micro_batch_losses(model, mb, s)
            loss = (pg_loss + s.vf_coef * v_loss) / accumulation
        loss.backward()
        loss_sum += loss.detach()
        stats.update(pg_loss=pg_loss.detach(), value_loss=v_loss.detach())
        for key, value in stats.items():
            step_stats[key] = step_stats.get(key, 0.0) + value.detach().float() / accumulation
    return loss_sum, step_stats


def ppo_epochs(model, rollout: Rollout, optimizer, scheduler, params: list[torch.nn.Parameter],
               s: UpdateSettings, generator: torch.Generator, next_ptx_batch, guard: NonFiniteGuard,
               iteration: int, halver: MicroBatchHalver) -> dict[str, torch.Tensor]:
    """Run `s.ppo_epochs` passes over `rollout`; returns the mean of each statistic (tensors, no sync).
    Micro-batches have `halver.micro_batch_size` rows; an out-of-memory halves it (when enabled) and
    redoes the mini-batch: the same rows, so the same update."""
    B = rollout.sequences.shape[0]
    device = rollout.sequences.device
    totals: dict[str, torch.Tensor] = {}
    n_updates = 0
    for epoch in range(s.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(device)  # a fresh shuffle every epoch
        for start in range(0, B, s.mini_batch_size):
            mini = order[start:start + s.mini_batch_size]
            loss_sum, step_stats = halver.run(
                lambda micro: _mini_batch_backward(model, rollout, mini, optimizer, s, micro), optimizer)
            if s.ptx_coef > 0:
                with autocast(device, s.precision):
                    lm_loss = ptx_loss(model, next_ptx_batch())
                (s.ptx_coef * lm_loss).backward()
                loss_sum += s.ptx_coef * lm_loss.detach()
                step_stats["ptx_loss"] = lm_loss.detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            if guard.ok(loss_sum, grad_norm, iteration, f"iteration {iteration} epoch {epoch} rows {mini.tolist()}"):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_stats["grad_norm"] = grad_norm.detach().float()
            for key, value in step_stats.items():
                totals[key] = totals.get(key, 0.0) + value
            n_updates += 1
    scheduler.step()
    return {key: value / n_updates for key, value in totals.items()}

"""The PPO / PPO-ptx recipe (InstructGPT stage 3), one iteration per rollout batch, in paper order.

    objective(phi) = E[ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ] + gamma * E[ log pi_phi(x) ]

Roles on the one shared base: `policy` (trainable, from the SFT adapter), `reference` (the frozen SFT
adapter), `reward` (the frozen RM) and `value` (trainable, from the RM adapter and head, as InstructGPT
initialises the value function from the RM).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.data import load_parts
from rlhf.metrics import postfix
from rlhf.models import RoleModel
from rlhf.ppo.batches import PretrainBatches, PromptBatches
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.kl_controller import KLController
from rlhf.ppo.rewards import score_penalties, shape_rewards
from rlhf.ppo.rollout import Rollout, sample, score
from rlhf.ppo.update import Trainer, ppo_epochs
from rlhf.stage_dirs import adapter_dir
from rlhf.progress import progress
from rlhf.stage_run import Piece, StageRun
from rlhf.training import MicroBatchHalver, NonFiniteGuard, build_optimizer, cosine_schedule
from rlhf_kernels import gae, whiten

log = logging.getLogger("rlhf.ppo")


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the valid tokens (cleanrl `explained_var`)."""
    v, r = values[mask], returns[mask]
    var_r = r.var(unbiased=False) if r.numel() > 1 else torch.zeros((), device=r.device)
    return torch.where(var_r > 0, 1 - (r - v).var(unbiased=False) / var_r, torch.full_like(var_r, float("nan")))


# what to lower when a PPO iteration runs out of memory (rollouts, scoring or the update)
PPO_MEMORY_SETTINGS = ["micro_batch_size", "rollout.batch_size", "rollout.max_new_tokens", "data.max_prompt_length"]


@dataclass
class IterationResult:
    rollout: Rollout
    scores: torch.Tensor  # [B] RM scores after the no-EOS penalty and clipping
    kl: torch.Tensor  # [B, T] per-token KL to the reference
    stats: dict[str, torch.Tensor]
    timings_s: dict[str, float]  # rollout_s, score_s, update_s


def ppo_iteration(cfg: PPOConfig, model: RoleModel, trainer: Trainer, prompts: tuple[torch.Tensor, torch.Tensor],
                  iteration: int) -> IterationResult:
    """Steps 1-5 of one PPO iteration on a batch of left-padded prompts ([B, P] ids and mask)."""
    t0 = time.perf_counter()
    # 1. rollout: sample one answer per prompt from the policy (KV cache, same temperature as scoring)
    rollout = sample(model, *prompts, cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
    t_rollout = time.perf_counter()
    # 2. score: policy and reference log-probs, values, RM score (no gradient)
    rollout = score(model, rollout, cfg.rollout.temperature, trainer.halver.micro_batch_size)
    # 3. rewards: -beta * kl_t on every answer token, the RM score at the last one
    scores = score_penalties(rollout.rm_scores, rollout.ended_with_eos, cfg.rollout.no_eos_score,
                             cfg.rollout.score_clip)  # [B]
    rewards, kl = shape_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.answer_mask,
                                trainer.kl_ctl.value, cfg.kl.estimator, cfg.rollout.whiten_rewards)  # [B, T]
    # 4. advantages: GAE, whitened over the valid tokens; returns = advantages + values
    advantages, rollout.returns = gae(rewards, rollout.values, rollout.answer_mask,
                                      gamma=cfg.gae.gamma, lam=cfg.gae.lam)  # [B, T]
    rollout.advantages = whiten(advantages, rollout.answer_mask)
    t_score = time.perf_counter()
    # 5. PPO epochs over reshuffled mini-batches: clipped policy loss + clipped value loss (+ ptx)
    stats = ppo_epochs(cfg, model, rollout, trainer, iteration)
    timings = {"rollout_s": t_rollout - t0, "score_s": t_score - t_rollout,
               "update_s": time.perf_counter() - t_score}
    return IterationResult(rollout, scores, kl, stats, timings)


def build_trainer(cfg: PPOConfig, model: RoleModel, ptx_batches: PretrainBatches | None,
                  guard: NonFiniteGuard | None = None, halver: MicroBatchHalver | None = None) -> Trainer:
    """One optimiser over the policy and value adapters (and the value head). `guard` and `halver`: the
    stage run's (new ones when PPO iterations run outside a stage run, as in tests and benchmarks)."""
    params = model.parameters("policy") + model.parameters("value")
    optimizer = build_optimizer(params, cfg.optim)
    guard = guard or NonFiniteGuard(cfg.max_nonfinite_in_a_row)
    halver = halver or MicroBatchHalver(cfg.micro_batch_size, cfg.auto_halve_micro_batch, "PPO iteration",
                                        PPO_MEMORY_SETTINGS)
    return Trainer(optimizer=optimizer, scheduler=cosine_schedule(optimizer, cfg.iterations, cfg.optim), params=params,
                   kl_ctl=KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon), guard=guard,
                   generator=torch.Generator().manual_seed(cfg.seed), ptx_batches=ptx_batches, halver=halver)


def build_roles(cfg: PPOConfig, device: torch.device, resume_from: Path | None) -> RoleModel:
    """policy <- SFT (or the checkpoint), reference <- SFT (frozen), reward <- RM (frozen), value <- RM."""
    model = RoleModel(cfg.model, device=device)
    sft = adapter_dir(cfg.sft_dir, "policy")
    rm = adapter_dir(cfg.rm_dir, "reward")
    model.add_role("reference", adapter_dir=sft, trainable=False)
    model.add_role("reward", adapter_dir=rm, trainable=False, head="reward")
    model.add_role("policy", adapter_dir=resume_from / "policy" if resume_from else sft, trainable=True)
    model.add_role("value", adapter_dir=resume_from / "value" if resume_from else rm, trainable=True, head="value")
    return model


def train(cfg: PPOConfig) -> Path:
    """Run PPO (ptx_coef > 0: PPO-ptx) and return the run directory (policy adapter in `out/policy`)."""
    with StageRun(cfg, "ppo", "PPO iteration", PPO_MEMORY_SETTINGS) as run:
        if run.finished:
            return run.out
        # train users only: tune users serve choices, test users the reported evaluation (issue 15.1)
        (train_prompts,) = load_parts(cfg.data.path, "prompts", ("train",), cfg.data.split, cfg.data.skip_invalid)
        model = build_roles(cfg, run.device, run.resume_from)
        prompt_batches = PromptBatches(train_prompts, model.tokenizer, cfg.rollout.batch_size,
                                       cfg.data.max_prompt_length, cfg.seed, run.device,
                                       cfg.data.use_chat_template)
        ptx_batches = None
        if cfg.ptx_coef > 0:
            # the held-out texts measure the pretraining loss at evaluation, so ptx never trains on them
            (texts,) = load_parts(cfg.data.pretrain, "pretrain", ("train",), cfg.data.split, cfg.data.skip_invalid)
            ptx_batches = PretrainBatches(texts, model.tokenizer, cfg.ptx_batch_size, cfg.data.max_pretrain_length,
                                          cfg.seed, run.device)
        trainer = build_trainer(cfg, model, ptx_batches, run.guard, run.halver)
        ptx_position = Piece(lambda: ptx_batches.position if ptx_batches else 0,
                             lambda position: setattr(ptx_batches, "position", position) if ptx_batches else None)
        start = run.begin(model, ["policy", "value"], trainer.optimizer, trainer.scheduler,
                          kl_controller=trainer.kl_ctl, generator=trainer.generator, ptx_position=ptx_position)
        bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="ppo", unit="it")
        for iteration in bar:
            t0 = time.perf_counter()
            result = ppo_iteration(cfg, model, trainer, prompt_batches.batch(iteration), iteration)
            rollout, scores, kl, stats = result.rollout, result.scores, result.kl, result.stats
            # 6. KL controller, log, checkpoint
            kl_per_answer = kl.sum(dim=1).mean()  # sequence-level KL, the quantity the controller targets
            trainer.kl_ctl.update(kl_per_answer.item(), cfg.rollout.batch_size)
            step = iteration + 1
            elapsed = time.perf_counter() - t0
            answer_tokens = rollout.answer_mask.sum()
            row = run.metrics.log(step, {
                "rm_score": rollout.rm_scores.mean(), "score_with_penalties": scores.mean(),
                "kl_to_ref": kl_per_answer, "kl_coef": trainer.kl_ctl.value, "answer_length": answer_tokens / len(scores),
                "no_eos_frac": 1.0 - rollout.ended_with_eos.float().mean(),
                "explained_variance": explained_variance(rollout.values, rollout.returns, rollout.answer_mask),
                **stats, "tokens_per_s": answer_tokens / elapsed, **result.timings_s,
                "lr": trainer.scheduler.get_last_lr()[0], "skipped_steps": run.guard.skipped_total})
            bar.set_postfix(postfix(row, ("rm_score", "kl_to_ref")))
            run.step_done(step, cfg.iterations)
        run.finish()
    log.info("PPO done: policy adapter in %s", run.out / "policy")
    return run.out

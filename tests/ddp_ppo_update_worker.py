"""One PPO update (2 epochs x 2 mini-batches, ptx on) from a fixed rollout, run by tests/test_distributed.py
on 1 process (`python tests/ddp_ppo_update_worker.py MODEL OUT`) and on 2 (`accelerate launch ... same`).
Rank 0 saves the trained policy and value parameters to OUT. Not a test file: a script the tests launch."""

from __future__ import annotations

import sys

import torch

from rlhf import distributed
from rlhf.models import ModelConfig, RoleModel
from rlhf.ppo.rollout import Rollout, answer_hidden, answer_labels
from rlhf.optim_config import OptimConfig
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.loop import build_trainer
from rlhf.ppo.update import ppo_epochs
from rlhf_kernels import fused_linear_token_logprobs

B, P, T, L = 8, 6, 5, 7  # rollout rows, prompt and answer tokens; ptx row length


def fixed_rollout(model: RoleModel, generator: torch.Generator) -> Rollout:
    V = model.lm_head_weight.shape[0]
    sequences = torch.randint(4, V, (B, P + T), generator=generator)  # [B, S]
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[::3, :2] = False  # some left padding
    answer_len = torch.randint(1, T + 1, (B,), generator=generator)
    answer_mask = torch.arange(T)[None, :] < answer_len[:, None]  # [B, T]
    rollout = Rollout(sequences=sequences, attention_mask=torch.cat([prompt_mask, answer_mask], dim=1),
                      answer_mask=answer_mask, ended_with_eos=answer_len < T, prompt_len=P)
    with torch.no_grad():
        hidden = answer_hidden(model, "policy", rollout)  # [B, T, H]
        logprobs = fused_linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head_weight,
                                               answer_labels(rollout).reshape(-1)).view(B, T)
    rollout.logprobs = logprobs + 0.05 * torch.randn(B, T, generator=generator) * answer_mask  # [B, T]
    rollout.values = 0.1 * torch.randn(B, T, generator=generator) * answer_mask
    rollout.advantages = torch.randn(B, T, generator=generator) * answer_mask
    rollout.returns = rollout.values + 0.1 * torch.randn(B, T, generator=generator)
    return rollout


class FixedPtx:
    """The same pretraining rows for every mini-batch (as PretrainBatches.next is called)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def next(self) -> dict[str, torch.Tensor]:
        return self.batch


def main(model_dir: str, out: str) -> None:
    distributed.init()
    torch.manual_seed(0)
    model = RoleModel(ModelConfig(path=model_dir, quantization="none"), device="cpu")
    model.add_role("policy", trainable=True)
    model.add_role("value", trainable=True, head="value")
    params = model.parameters("policy") + model.parameters("value")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at 0: move every weight so that every gradient is non-zero
        for p in params:
            p.add_(0.03 * torch.randn(p.shape, generator=generator))
    rollout = fixed_rollout(model, generator)
    V = model.lm_head_weight.shape[0]
    ptx_ids = torch.randint(4, V, (4, L), generator=generator)
    ptx = {"input_ids": ptx_ids, "attention_mask": torch.ones_like(ptx_ids, dtype=torch.bool),
           "labels": torch.cat([ptx_ids[:, 1:], torch.full((4, 1), -100)], dim=1)}
    cfg = PPOConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=1,  # 4 micro-batches per mini-batch
                    ptx_coef=0.5, iterations=1, precision="fp32",
                    optim=OptimConfig(lr=1e-2, warmup_steps=0, adam_eps=1e-5))
    trainer = build_trainer(cfg, model, FixedPtx(ptx))
    stats = ppo_epochs(cfg, model, rollout, trainer, 0)
    if distributed.is_main():
        torch.save({"params": [p.detach().clone() for p in params],
                    "stats": {k: float(v) for k, v in stats.items()}}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

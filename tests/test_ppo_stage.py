"""The PPO stage (rlhf.ppo), the evaluation (rlhf.eval) and the whole pipeline (rlhf.pipeline).

Proved here, each against a formula written out in the test (the kernels' own math, GAE and the
clipped losses, is proved in tests/kernels/):
- per-token rewards are -beta * KL on every answer token plus the RM score on the last one (k1, k3);
  answers without EOS get `no_eos_score`, and scores are clipped;
- the adaptive KL controller follows Ziegler et al.'s rule, the fixed one never moves;
- the answer mask stops at the first EOS; explained variance is the masked formula;
- rollout scoring (log-probs at the sampling temperature, values, RM score) equals a forward pass on
  each row alone, unpadded; the PPO-ptx loss is the mean NLL of the pretraining tokens;
- a few PPO iterations against a stub reward move the policy toward what the reward pays for;
- the pipeline runs end to end on CPU with the toy world, and `rlhf eval` on its saved adapters
  reproduces its table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlhf.eval
import rlhf.ppo.loop
from rlhf.config import load_config
from rlhf.data import load_records, pad_left
from rlhf.models import ModelConfig, RoleModel, load_tokenizer
from rlhf.pipeline import PipelineConfig
from rlhf.pipeline import run as run_pipeline
from rlhf.ppo import PPOConfig
from rlhf.ppo.batches import PretrainBatches, PromptBatches
from rlhf.ppo.kl_controller import KLController
from rlhf.ppo.loop import build_roles, build_trainer, explained_variance, ppo_iteration
from rlhf.ppo.rewards import last_token_index, score_penalties, shape_rewards
from rlhf.ppo.rollout import answer_mask_from, sample, score
from rlhf.ppo.update import mini_batch_backward, ptx_nll_sum
from rlhf.toy import ToyConfig, gold_score, write_toy_world

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
EVAL_METRICS = ("rm_score", "gold_score", "kl_to_sft", "pretrain_loss", "answer_length")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturb(model: RoleModel, role: str, seed: int, scale: float = 0.1) -> None:
    """Give a role's adapter (and head) random weights, so it differs from the base and the other roles."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters(role):
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


# ------------------------------------------------------------------------------------------------
# Rewards: shape_rewards, score_penalties, last_token_index
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shape_rewards_is_kl_penalty_on_every_answer_token_plus_score_on_the_last(estimator):
    generator = torch.Generator().manual_seed(0)
    lengths = [6, 3, 1, 0]  # a full row, two shorter ones, an empty answer
    B, T = len(lengths), 6
    logprobs = -3 * torch.rand(B, T, generator=generator)
    ref_logprobs = -3 * torch.rand(B, T, generator=generator)
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    rm_scores = torch.tensor([0.5, -1.25, 2.0, 3.0])
    scores_before = rm_scores.clone()
    beta = 0.1

    rewards, kl = shape_rewards(rm_scores, logprobs, ref_logprobs, mask, beta, estimator)

    assert rewards.shape == kl.shape == (B, T)
    for b, n in enumerate(lengths):
        for t in range(T):
            if t < n:
                r = ref_logprobs[b, t].item() - logprobs[b, t].item()
                if estimator == "k1":
                    want_kl = logprobs[b, t].item() - ref_logprobs[b, t].item()
                else:
                    want_kl = math.exp(r) - r - 1
                want_reward = -beta * want_kl + (rm_scores[b].item() if t == n - 1 else 0.0)
            else:
                want_kl = want_reward = 0.0
            assert kl[b, t].item() == pytest.approx(want_kl, rel=1e-5, abs=1e-6), (b, t)
            assert rewards[b, t].item() == pytest.approx(want_reward, rel=1e-5, abs=1e-6), (b, t)
    assert torch.all(rewards[3] == 0)  # the empty answer's score lands nowhere
    assert torch.equal(rm_scores, scores_before)
    if estimator == "k3":
        assert torch.all(kl[mask] >= 0)  # k3 is never negative


def test_last_token_index_of_right_padded_masks():
    mask = torch.tensor([[True, True, True, False],
                         [True, False, False, False],
                         [True, True, True, True],
                         [False, False, False, False]])
    assert last_token_index(mask).tolist() == [2, 0, 3, 0]


def test_score_penalties_no_eos_score_and_clip():
    rm = torch.tensor([0.3, -2.5, 4.0, 1.0])
    ended = torch.tensor([True, True, False, False])
    assert score_penalties(rm, ended, -1.0, None).tolist() == pytest.approx([0.3, -2.5, -1.0, -1.0])
    assert score_penalties(rm, ended, None, None).tolist() == pytest.approx([0.3, -2.5, 4.0, 1.0])
    assert score_penalties(rm, ended, None, 2.0).tolist() == pytest.approx([0.3, -2.0, 2.0, 1.0])
    # the penalty first, then the clip bounds it too
    assert score_penalties(rm, ended, -3.0, 2.0).tolist() == pytest.approx([0.3, -2.0, -2.0, -2.0])
    assert score_penalties(rm.bfloat16(), ended, -1.0, None).dtype == torch.float32
    assert rm.tolist() == pytest.approx([0.3, -2.5, 4.0, 1.0])  # the input is left alone


# ------------------------------------------------------------------------------------------------
# KLController
# ------------------------------------------------------------------------------------------------
def test_fixed_kl_coef_never_moves():
    ctl = KLController(0.02)
    for current in (0.0, 0.5, 100.0):
        ctl.update(current, 512)
    assert ctl.value == 0.02


def test_adaptive_kl_coef_follows_ziegler_rule():
    """err = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + err * n / horizon (numbers worked by hand)."""
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, 256)  # err = +0.1: beta * (1 + 0.1 * 256 / 10000) = beta * 1.00256
    assert ctl.value == pytest.approx(0.1 * 1.00256, rel=1e-12)
    ctl.update(60.0, 256)  # err = +9 clipped to +0.2: * 1.00512
    assert ctl.value == pytest.approx(0.1 * 1.00256 * 1.00512, rel=1e-12)
    ctl.update(6.0, 256)  # on target: unchanged
    assert ctl.value == pytest.approx(0.1 * 1.00256 * 1.00512, rel=1e-12)
    ctl.update(5.4, 1000)  # err = -0.1: * (1 - 0.1 * 1000 / 10000) = * 0.99
    assert ctl.value == pytest.approx(0.1 * 1.00256 * 1.00512 * 0.99, rel=1e-12)
    ctl.update(0.0, 1000)  # err = -1 clipped to -0.2: * 0.98
    assert ctl.value == pytest.approx(0.1 * 1.00256 * 1.00512 * 0.99 * 0.98, rel=1e-12)

    restored = KLController(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    for controller in (ctl, restored):
        controller.update(9.0, 64)  # err = +0.5 clipped to +0.2: * 1.00128
    assert restored.value == ctl.value == pytest.approx(0.1 * 1.00256 * 1.00512 * 0.99 * 0.98 * 1.00128, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# answer_mask_from, explained_variance
# ------------------------------------------------------------------------------------------------
def test_answer_mask_stops_at_the_first_eos():
    eos, pad = 3, 0
    answers = torch.tensor([[5, 6, eos, pad, pad],  # stopped, then padded by generate
                            [eos, 7, eos, 8, pad],  # EOS first: only the EOS counts
                            [5, 6, 7, 8, 9],  # cut off at max_new_tokens
                            [5, pad, 6, eos, 9]])  # a sampled pad before EOS counts like any token
    mask, ended = answer_mask_from(answers, eos)
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, False, False, False, False],
                             [True, True, True, True, True],
                             [True, True, True, True, False]]
    assert ended.tolist() == [True, True, False, True]


def test_explained_variance_is_the_masked_formula():
    generator = torch.Generator().manual_seed(1)
    returns = torch.randn(3, 5, generator=generator)
    values = returns + 0.5 * torch.randn(3, 5, generator=generator)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, True, True, False, False]])
    values[~mask], returns[~mask] = 100.0, -100.0  # must not count
    r = [x for x, m in zip(returns.flatten().tolist(), mask.flatten().tolist()) if m]
    v = [x for x, m in zip(values.flatten().tolist(), mask.flatten().tolist()) if m]

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    want = 1 - var([a - b for a, b in zip(r, v)]) / var(r)
    assert explained_variance(values, returns, mask).item() == pytest.approx(want, rel=1e-5)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    mean_r = torch.full_like(returns, sum(r) / len(r))
    assert explained_variance(mean_r, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())  # Var[returns] = 0


# ------------------------------------------------------------------------------------------------
# On the quick toy world's base: fresh SFT and RM run dirs (LoRA B = 0, so every role starts as the base)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_runs(quick_toy_world, tmp_path_factory):
    """(sft_dir, rm_dir) holding freshly initialised policy and reward adapters (no training needed here)."""
    root = tmp_path_factory.mktemp("ppo-stage")
    torch.manual_seed(0)
    model = RoleModel(ModelConfig(path=str(quick_toy_world.model), quantization="none"), device=CPU)
    model.add_role("policy")
    model.add_role("reward", head="reward")
    model.save_role("policy", root / "sft" / "policy")
    model.save_role("reward", root / "rm" / "reward")
    return root / "sft", root / "rm"


def ppo_config(world, runs, out: Path, **overrides) -> PPOConfig:
    sft, rm = runs
    fields = {"model.path": str(world.model), "model.quantization": "none", "data.path": str(world.prompts),
              "sft_dir": str(sft), "rm_dir": str(rm), "out_dir": str(out), "device": "cpu"}
    return load_config(PPOConfig, overrides={**fields, **overrides})


def test_sample_and_score_match_a_forward_pass_on_each_unpadded_row(quick_toy_world, fresh_runs, tmp_path):
    """Log-probs at the sampling temperature, values and RM scores of a left-padded, micro-batched rollout
    equal those of each prompt + answer (up to its first EOS) run alone, without padding."""
    cfg = ppo_config(quick_toy_world, fresh_runs, tmp_path)
    model = build_roles(cfg, CPU, None)
    for seed, role in enumerate(("policy", "reference", "reward", "value")):
        perturb(model, role, seed, scale=0.03)  # different roles, still close enough to the base to stop
    prompt_ids, prompt_mask = PromptBatches(load_records(quick_toy_world.prompts, "prompts"), model.tokenizer,
                                            7, 48, 0, CPU).batch(0)
    assert not prompt_mask.all()  # prompts of different lengths: some rows are padded
    temperature, eos = 0.7, model.tokenizer.eos_token_id
    torch.manual_seed(0)
    rollout = sample(model, prompt_ids, prompt_mask, 6, temperature, 1.0)
    P = prompt_ids.shape[1]
    assert rollout.prompt_len == P and torch.equal(rollout.sequences[:, :P], prompt_ids)
    assert torch.equal(rollout.attention_mask, torch.cat([prompt_mask, rollout.answer_mask], dim=1))
    for b, answer in enumerate(rollout.answers.tolist()):
        stop = answer.index(eos) + 1 if eos in answer else len(answer)
        assert rollout.answer_mask[b].tolist() == [t < stop for t in range(len(answer))]
        assert rollout.ended_with_eos[b].item() == (eos in answer)
    assert rollout.ended_with_eos.any() and not rollout.ended_with_eos.all()  # stopped and cut-off rows

    rollout = score(model, rollout, temperature, micro_batch_size=3)  # 7 rows: micro-batches 3, 3, 1
    for b in range(len(prompt_ids)):
        row = rollout.sequences[b][rollout.attention_mask[b]][None]  # [1, n_prompt + n_answer]
        n_prompt, n_answer = int(prompt_mask[b].sum()), int(rollout.answer_mask[b].sum())
        answer = row[0, n_prompt:]
        for name, role in (("logprobs", "policy"), ("ref_logprobs", "reference")):
            with torch.no_grad(), model.use(role):
                logits = model._causal_lm(input_ids=row).logits[0].float()  # [S, V]
            logp = torch.log_softmax(logits / temperature, dim=-1)[n_prompt - 1:-1].gather(1, answer[:, None])[:, 0]
            got = getattr(rollout, name)[b]
            torch.testing.assert_close(got[:n_answer], logp, rtol=1e-4, atol=1e-5)
            assert torch.all(got[n_answer:] == 0)
        with torch.no_grad():
            values = model.values("value", row, torch.ones_like(row))[0, n_prompt - 1:-1]
            rm_score = model.reward_scores("reward", row, torch.ones_like(row))[0]
        torch.testing.assert_close(rollout.values[b, :n_answer], values, rtol=1e-4, atol=1e-5)
        assert torch.all(rollout.values[b, n_answer:] == 0)
        torch.testing.assert_close(rollout.rm_scores[b], rm_score, rtol=1e-4, atol=1e-5)
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() > 1e-2  # the two roles really differ


def test_ptx_nll_is_the_nll_of_the_pretraining_tokens(quick_toy_world):
    model = RoleModel(ModelConfig(path=str(quick_toy_world.model), quantization="none"), device=CPU)
    model.add_role("policy", trainable=True)
    perturb(model, "policy", 3)
    texts = load_records(quick_toy_world.pretrain, "pretrain")[:40]
    batch = PretrainBatches(texts, model.tokenizer, 6, 10, 0, CPU).next()  # 10 tokens: long texts are cut
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()  # rows of different lengths

    def direct_nll(role):
        with torch.no_grad(), model.use(role):
            logits = model._causal_lm(input_ids=ids, attention_mask=mask.long()).logits.float()  # [b, S, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # [b, S-1]
        valid = mask[:, 1:]  # every real token but each row's first is predicted
        return -(logp * valid).sum() / valid.sum()

    hidden = model.hidden_states("policy", ids, mask)  # [b, S, H]
    loss = ptx_nll_sum(model, hidden, batch["labels"]) / (batch["labels"] != -100).sum()
    torch.testing.assert_close(loss.detach(), direct_nll("policy"), rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - direct_nll(None).item()) > 1e-3  # the policy's adapter, not the bare base
    loss.backward()
    assert all(p.grad is not None for p in model.parameters("policy"))
    assert any(p.grad.abs().sum() > 0 for p in model.parameters("policy"))


def test_a_mini_batch_gives_one_gradient_however_it_is_split_into_micro_batches(quick_toy_world, fresh_runs,
                                                                               tmp_path):
    """Policy, value and ptx rows in one forward per micro-batch, the ptx rows shared out over the
    micro-batches: the accumulated gradient and the logged losses do not depend on the split, and the
    ptx loss is the mean NLL of all the mini-batch's pretraining tokens."""
    cfg = ppo_config(quick_toy_world, fresh_runs, tmp_path)
    model = build_roles(cfg, CPU, None)
    for seed, role in enumerate(("policy", "reference", "reward", "value")):
        perturb(model, role, seed, scale=0.03)
    prompt_ids, prompt_mask = PromptBatches(load_records(quick_toy_world.prompts, "prompts"), model.tokenizer,
                                            8, 48, 0, CPU).batch(0)
    torch.manual_seed(0)
    rollout = sample(model, prompt_ids, prompt_mask, 6, 1.0, 1.0)
    # every answer token counts, so each micro-batch has as many as the next: the PPO and value terms,
    # token means per micro-batch averaged over micro-batches (as TRL), then equal the mini-batch's means
    rollout.answer_mask = torch.ones_like(rollout.answer_mask)
    rollout.attention_mask = torch.cat([prompt_mask, rollout.answer_mask], dim=1)
    rollout = score(model, rollout, 1.0, micro_batch_size=8)
    generator = torch.Generator().manual_seed(0)
    rollout.advantages = torch.randn(rollout.logprobs.shape, generator=generator) * rollout.answer_mask
    rollout.returns = rollout.values + 0.1 * torch.randn(rollout.values.shape, generator=generator)
    texts = load_records(quick_toy_world.pretrain, "pretrain")[:40]
    ptx = PretrainBatches(texts, model.tokenizer, 6, 20, 0, CPU).next()  # 6 rows, 20 tokens: another length
    settings = dataclasses.replace(cfg, ptx_coef=2.0, precision="fp32")  # clip 0.2, value clip 0.2, vf_coef 0.1
    params = model.parameters("policy") + model.parameters("value")
    optimizer = torch.optim.SGD(params, lr=0.0)  # only its zero_grad is used
    runs = {}
    for micro in (8, 4, 2):  # 1, 2 and 4 micro-batches; the 6 ptx rows go 6 / 3+3 / 1+2+1+2
        optimizer.zero_grad(set_to_none=True)
        loss, stats = mini_batch_backward(model, rollout, torch.arange(8), settings, micro, ptx)
        runs[micro] = (loss, stats, [p.grad.clone() for p in params])
    with torch.no_grad():
        labels = ptx["labels"]
        hidden = model.hidden_states("policy", ptx["input_ids"], ptx["attention_mask"])
        expected_ptx = ptx_nll_sum(model, hidden, labels) / (labels != -100).sum()
    torch.testing.assert_close(runs[8][1]["ptx_loss"], expected_ptx, rtol=1e-5, atol=1e-6)
    for micro in (4, 2):
        loss, stats, grads = runs[micro]
        torch.testing.assert_close(loss, runs[8][0], rtol=1e-5, atol=1e-6)
        for key in ("pg_loss", "value_loss", "ptx_loss"):
            torch.testing.assert_close(stats[key], runs[8][1][key], rtol=1e-5, atol=1e-6)
        for grad, whole in zip(grads, runs[8][2]):
            torch.testing.assert_close(grad, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
    assert any(g.abs().sum() > 0 for g in runs[8][2])


# ------------------------------------------------------------------------------------------------
# PPO iterations against a stub reward
# ------------------------------------------------------------------------------------------------
def first_token_probability(model: RoleModel, prompts: list[dict], token: int) -> float:
    """The policy's probability of `token` as the first answer token, averaged over `prompts`."""
    padded = pad_left([p["input_ids"] for p in prompts], model.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = model.hidden_states("policy", padded["input_ids"], padded["attention_mask"])[:, -1]  # [N, H]
        probs = torch.softmax(hidden @ model.lm_head_weight.T, dim=-1)  # [N, V]
    return probs[:, token].mean().item()


def run_against_stub_reward(world, runs, out: Path, monkeypatch, token: int, sign: float,
                            iterations: int = 10) -> tuple[float, float]:
    """`iterations` PPO iterations where the RM score is +sign for answers starting with `token`, -sign
    otherwise. -> (probability of `token` first, before; after), over the training prompts."""
    cfg = ppo_config(world, runs, out, **{
        "iterations": iterations, "rollout.batch_size": 32, "mini_batch_size": 16, "micro_batch_size": 16,
        "ppo_epochs": 2, "rollout.max_new_tokens": 3, "rollout.no_eos_score": None, "kl.coef": 0.01,
        "optim.lr": 3e-3})
    real_score = rlhf.ppo.loop.score

    def stub_score(model, rollout, temperature, micro_batch_size):
        rollout = real_score(model, rollout, temperature, micro_batch_size)  # log-probs and values stay real
        rollout.rm_scores = torch.where(rollout.answers[:, 0] == token, sign, -sign)
        return rollout

    monkeypatch.setattr(rlhf.ppo.loop, "score", stub_score)
    torch.manual_seed(cfg.seed)
    model = build_roles(cfg, CPU, None)
    batches = PromptBatches(load_records(world.prompts, "prompts"), model.tokenizer, cfg.rollout.batch_size,
                            cfg.data.max_prompt_length, cfg.seed, CPU)
    trainer = build_trainer(cfg, model, None)
    before = first_token_probability(model, batches.examples, token)
    for iteration in range(iterations):
        result = ppo_iteration(cfg, model, trainer, batches.batch(iteration), iteration)
        assert torch.equal(result.scores, torch.where(result.rollout.answers[:, 0] == token, sign, -sign))
    return before, first_token_probability(model, batches.examples, token)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["rewarded", "penalised"])
def test_ppo_moves_the_policy_toward_the_reward(quick_toy_world, fresh_runs, tmp_path, monkeypatch, sign):
    """Paid for starting its answer with ".", the policy says "." first far more often after 10
    iterations; penalised for it, far less often. Measured: 0.082 -> 0.380 rewarded (the ceiling is ~0.39:
    the frozen final norm and unembedding of the 30-step toy base allow no more), 0.082 -> 0.005 penalised."""
    [token] = load_tokenizer(str(quick_toy_world.model))(".", add_special_tokens=False)["input_ids"]
    before, after = run_against_stub_reward(quick_toy_world, fresh_runs, tmp_path, monkeypatch, token, sign)
    assert 0.02 < before < 0.3
    if sign > 0:
        assert after > before + 0.15, (before, after)
    else:
        assert after < before / 3, (before, after)


# ------------------------------------------------------------------------------------------------
# The pipeline, end to end on CPU, then `rlhf eval` on what it saved
# ------------------------------------------------------------------------------------------------
PIPELINE_OVERRIDES = {
    "quantization": "none", "device": "cpu", "rm_k": 4,
    "sft.epochs": 1, "sft.batch_size": 16, "sft.micro_batch_size": 16, "sft.eval_every": 1000,
    "rm.batch_size": 8, "rm.micro_batch_size": 8, "rm.eval_every": 1000,
    "ppo.iterations": 2, "ppo.rollout.batch_size": 8, "ppo.mini_batch_size": 8, "ppo.micro_batch_size": 8,
    "ppo.ppo_epochs": 1, "ppo.rollout.max_new_tokens": 8, "ppo.ptx_batch_size": 4,
    "eval.data.max_prompts": 16, "eval.data.max_pretrain_chunks": 16, "eval.answers_per_prompt": 2,
    "eval.best_of_n": [1, 2], "eval.temperatures": [0.5], "eval.bootstrap_resamples": 200,
}
EVAL_ROWS = ["sft", "best_of_1", "best_of_2", "sft_t0.5", "ppo", "ppo_ptx"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`rlhf pipeline` with no data given: it writes the (quick) toy world itself, labels sampled answers,
    trains SFT, RM, PPO and PPO-ptx for a few steps each and evaluates.
    -> (out_dir, result, judged: the evaluation's gold-judge calls, (prompt, answer, score) in call order)"""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = load_config(PipelineConfig, overrides={"out_dir": str(out), **PIPELINE_OVERRIDES})
    cfg.toy = ToyConfig.quick()
    assert cfg.uses_toy() and cfg.rm_labels == "sampled" and cfg.ppo_variants == ["ppo", "ppo_ptx"]
    judged = []

    def recording_judge(prompt: str, answer: str) -> float:
        judged.append((prompt, answer, gold_score(prompt, answer)))
        return judged[-1][2]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rlhf.eval, "_gold_judge", lambda kind: recording_judge if kind == "toy" else None)
        result = run_pipeline(cfg)
    return out, result, judged


def check_eval_result(result: dict) -> None:
    assert list(result["policies"]) == EVAL_ROWS
    assert 0 < result["n_prompts"] <= 16 and result["answers_per_prompt"] == 2 and result["part"] == "test"
    for name, row in result["policies"].items():
        keys = EVAL_METRICS if row["kind"] in ("sft", "policy") else ("rm_score", "gold_score", "kl_to_sft",
                                                                      "answer_length")
        for key in keys:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
        assert 0.0 <= row["gold_ci"][0] <= row["gold_score"] <= row["gold_ci"][1] <= 1.0
        assert len(row["examples"]) == min(5, result["n_prompts"])
    assert result["policies"]["sft"]["kl_to_sft"] == 0.0
    assert "win_rate_vs_sft" not in result["policies"]["sft"]
    assert set(result["win_rate_vs_sft"]) == {"ppo", "ppo_ptx"}
    for name, rate in result["win_rate_vs_sft"].items():
        assert result["policies"][name]["win_rate_vs_sft"] == rate
        low, high = result["policies"][name]["win_rate_ci"]
        assert 0.0 <= low <= rate <= high <= 1.0
    # best-of-n: its KL estimate below the analytic bound; the colder SFT is a different policy (KL > 0)
    for n in (1, 2):
        row = result["policies"][f"best_of_{n}"]
        assert 0.0 <= row["kl_to_sft"] <= row["kl_bound"] + 1e-9
    assert result["policies"]["sft_t0.5"]["kl_to_sft"] > 0.0
    assert result["rm_diagnostics"]["pairs"] + result["rm_diagnostics"]["tied_pairs_dropped"] > 0


@pytest.mark.slow
def test_pipeline_runs_every_stage_end_to_end_on_cpu(pipeline_run):
    out, result, judged = pipeline_run
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    check_eval_result(saved)
    assert (out / "gold_vs_kl.png").read_bytes().startswith(b"\x89PNG")
    # gold scores and win rates from the judge's own verdicts, called row by row, prompt-major
    n_prompts, k, k_sft = saved["n_prompts"], saved["answers_per_prompt"], saved["sft_samples_per_prompt"]
    sizes = {"sft": k_sft, "best_of_1": 1, "best_of_2": 1, "sft_t0.5": k, "ppo": k, "ppo_ptx": k}
    assert len(judged) == n_prompts * sum(sizes.values())
    verdicts, start = {}, 0
    for name, per_prompt in sizes.items():
        rows = judged[start:start + n_prompts * per_prompt]
        verdicts[name] = [rows[p * per_prompt:(p + 1) * per_prompt] for p in range(n_prompts)]
        start += n_prompts * per_prompt
    prompts = [answers[0][0] for answers in verdicts["sft"]]
    for name, answers in verdicts.items():
        assert [a[0][0] for a in answers] == prompts  # every row answered the same prompts
        row = saved["policies"][name]
        scores = [[s for _, _, s in a] for a in answers]
        assert row["gold_score"] == pytest.approx(sum(sum(s) / len(s) for s in scores) / n_prompts)
        assert [e["answer"] for e in row["examples"]] == [a[0][1] for a in answers[:5]]
        if name != "sft":  # every answer against every SFT answer to the same prompt, ties 1/2
            sft_scores = [[s for _, _, s in a] for a in verdicts["sft"]]
            per_prompt_wins = [sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in mine for y in theirs)
                               / (len(mine) * len(theirs)) for mine, theirs in zip(scores, sft_scores)]
            assert row["win_rate_vs_sft"] == pytest.approx(sum(per_prompt_wins) / n_prompts)
    # best-of-1 keeps the first SFT answer of each prompt
    assert [a[0][1] for a in verdicts["best_of_1"]] == [a[0][1] for a in verdicts["sft"]]
    for stage in ("sft", "rm", "ppo", "ppo_ptx"):
        assert (out / stage / "DONE").is_file(), stage
    assert (out / "toy" / "model" / "config.json").is_file()
    assert (out / "ppo_ptx" / "policy" / "adapter_model.safetensors").is_file()
    # only the ptx variant optimised the pretraining term
    assert any("ptx_loss" in json.loads(line) for line in (out / "ppo_ptx" / "metrics.jsonl").open())
    assert not any("ptx_loss" in json.loads(line) for line in (out / "ppo" / "metrics.jsonl").open())

    # labelling: K = rm_k SFT samples per RM prompt, distinct, ordered best first by the toy labeller
    # (answers the judge scores equally are a tie: one of them is kept, so no pair in a ranking is tied)
    rankings = [json.loads(line) for line in (out / "rm_rankings.jsonl").open()]
    rm_prompts = {r["prompt"] for r in load_records(out / "toy" / "rankings.jsonl", "rankings")}
    assert len(rankings) > 0.3 * len(rm_prompts)
    for record in rankings:
        assert record["prompt"] in rm_prompts
        assert 2 <= len(record["responses"]) <= 4
        scores = [gold_score(record["prompt"], answer) for answer in record["responses"]]
        assert scores == sorted(set(scores), reverse=True)  # best first, no two tied


@pytest.mark.slow
def test_eval_cli_on_the_saved_adapters_reproduces_the_table(pipeline_run, tmp_path):
    out, result, _ = pipeline_run
    world = write_toy_world(out / "toy", ToyConfig.quick())  # already written: returns its paths
    eval_out = tmp_path / "eval"
    args = ["eval", "--model", str(world.model), "--data", str(world.prompts), "--pretrain", str(world.pretrain),
            "--sft", str(out / "sft"), "--rm", str(out / "rm"),
            "--policies", f"{{ppo: '{out / 'ppo'}', ppo_ptx: '{out / 'ppo_ptx'}'}}", "--gold", "toy",
            "--out", str(eval_out), "--model.quantization", "none", "--device", "cpu", "--max_new_tokens", "8",
            "--data.max_prompts", "16", "--data.max_pretrain_chunks", "16", "--answers_per_prompt", "2",
            "--best_of_n", "[1, 2]", "--temperatures", "[0.5]", "--bootstrap_resamples", "200"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RLHF_KERNELS_BACKEND="torch",
               TQDM_DISABLE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "rlhf", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = proc.stdout.strip().splitlines()  # the table is the last thing printed
    rows = len(EVAL_ROWS)
    assert len(lines) >= rows + 2, proc.stdout
    header = lines[-rows - 2].split()
    assert header[0] == "policy" and set(EVAL_METRICS) | {"win_rate_vs_sft"} <= set(header), proc.stdout
    assert [line.split()[0] for line in lines[-rows - 1:-1]] == EVAL_ROWS, proc.stdout
    assert lines[-1].startswith(f"test prompts: {result['n_prompts']} (users never seen in training)"), proc.stdout

    saved = json.loads((eval_out / "eval.json").read_text())
    check_eval_result(saved)
    # the same prompts, sampling seed and adapters as the pipeline's evaluation: the same numbers
    for name, row in result["policies"].items():
        assert saved["policies"][name].keys() == row.keys()
        for key in (k for k in EVAL_METRICS if k in row):
            assert saved["policies"][name][key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (name, key)
        assert saved["policies"][name]["examples"] == row["examples"]
    assert saved["win_rate_vs_sft"] == result["win_rate_vs_sft"]

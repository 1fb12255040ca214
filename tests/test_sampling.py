"""The rollout sampler (`rlhf.models.sampling`): the same draws as transformers' `generate`, and its
own edge cases (EOS, padding after it, trimming, min_new_tokens, nucleus) on a scripted model."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from rlhf.models.sampling import sample_with_cache, top_p_filter
from tests.test_models import generate, make_model, perturb

EOS, PAD = 1, 0


@pytest.mark.parametrize("arch, quantization", [("llama", "none"), ("llama", "nf4"), ("gpt2", "none")])
def test_sample_draws_the_tokens_generate_draws(tiny_model_dir, arch, quantization):
    model = make_model(tiny_model_dir(arch), quantization, roles=("reference", "policy"))
    perturb(model, "policy", seed=4)
    pad_id = model.tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad_id, pad_id, 10, 11, 12], [20, 21, 22, 23, 24], [pad_id, 30, 31, 32, 33]])
    prompt_mask = prompt_ids != pad_id  # [B, P], left-padded
    ended_early = 0
    for seed, temperature, top_p, max_new in [(0, 1.0, 1.0, 12), (1, 3.0, 1.0, 40), (2, 0.7, 0.8, 12),
                                              (3, 4.0, 0.95, 40), (4, 4.0, 1.0, 40)]:
        torch.manual_seed(seed)
        ours = model.sample("policy", prompt_ids, prompt_mask, max_new, temperature, top_p)  # [B, P + T]
        torch.manual_seed(seed)
        theirs = generate(model, "policy", prompt_ids, prompt_mask, max_new_tokens=max_new, temperature=temperature,
                                top_p=top_p)  # [B, P + T]
        assert torch.equal(ours, theirs), (seed, ours, theirs)
        answers = ours[:, 5:]
        ended_early += int(((answers == model.tokenizer.eos_token_id).cumsum(1) > 0)[:, :-1].any())
    assert ended_early, "no row stopped early: the comparison never covered EOS and the padding after it"


def test_sample_is_refused_for_right_padded_prompts(tiny_model_dir):
    model = make_model(tiny_model_dir("llama"), roles=("policy",))
    ids = torch.tensor([[10, 11, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model.sample("policy", ids, torch.tensor([[True, True, False]]), 3)


class ScriptedLM(torch.nn.Module):
    """A causal LM whose next-token logits are read from a script: step t's logits for every row are
    `script[t]` ([B, V]). Records the arguments of each call to check the cache and positions."""

    def __init__(self, script: torch.Tensor):
        super().__init__()
        self.script = script  # [steps, B, V]
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, cache=None, logits_to_keep=None):
        step = len(self.calls)
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                           "cache": cache, "logits_to_keep": logits_to_keep})
        return {"logits": self.script[step][:, None, :], "cache": f"cache after call {step}"}


def one_hot_logits(tokens_per_step: list[list[int]], vocab: int = 6) -> torch.Tensor:
    """Logits that make each row's sample certain: 0 on the scripted token, -inf elsewhere."""
    script = torch.full((len(tokens_per_step), len(tokens_per_step[0]), vocab), float("-inf"))
    for t, row_tokens in enumerate(tokens_per_step):
        for b, token in enumerate(row_tokens):
            script[t, b, token] = 0.0
    return script


def run(script: torch.Tensor, max_new_tokens: int, **kwargs) -> tuple[torch.Tensor, ScriptedLM]:
    lm = ScriptedLM(script)
    prompt = torch.tensor([[PAD, 4], [5, 4]])  # [B, P], the first row left-padded
    with torch.no_grad():
        out = sample_with_cache(lm, prompt, (prompt != PAD).long(), max_new_tokens, eos_id=EOS, pad_id=PAD, **kwargs)
    return out, lm


def test_rows_pad_after_their_eos_and_the_output_stops_when_all_have_ended():
    out, lm = run(one_hot_logits([[2, 3], [EOS, 3], [4, EOS], [5, 5], [5, 5]]), max_new_tokens=5)
    assert out.tolist() == [[PAD, 4, 2, EOS, PAD], [5, 4, 3, 3, EOS]]
    assert len(lm.calls) == 3  # prefill + two decode steps: nothing after the last EOS
    # the cache goes from each call to the next; positions count real tokens only
    assert [call["cache"] for call in lm.calls[1:]] == ["cache after call 0", "cache after call 1"]
    assert lm.calls[0]["position_ids"].tolist() == [[0, 0], [0, 1]]
    assert lm.calls[1]["position_ids"].tolist() == [[1], [2]]
    assert lm.calls[2]["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert lm.calls[0]["logits_to_keep"] == 1


def test_checking_for_the_end_every_few_steps_gives_the_same_output():
    # as on a GPU: the loop runs past the last EOS until the next check, then trims those columns
    script = one_hot_logits([[2, 3], [EOS, 3], [4, EOS], [5, 5], [5, 5], [5, 5], [5, 5]])
    every_step, _ = run(script, max_new_tokens=7)
    every_four, lm = run(script, max_new_tokens=7, stop_check_every=4)
    assert torch.equal(every_four, every_step) and every_step.shape == (2, 2 + 3)
    assert len(lm.calls) == 4  # prefill + 3 decode steps: the 4th sampled token triggered the check


def test_unfinished_rows_run_to_max_new_tokens():
    out, _ = run(one_hot_logits([[EOS, 2], [3, 2], [3, 3]]), max_new_tokens=3)
    assert out.tolist() == [[PAD, 4, EOS, PAD, PAD], [5, 4, 2, 2, 3]]


def test_min_new_tokens_forbids_eos_until_reached():
    script = torch.zeros(4, 2, 6)  # uniform over 6 tokens
    script[:, :, EOS] = 30.0  # EOS all but certain whenever it is allowed
    torch.manual_seed(0)
    out, _ = run(script, max_new_tokens=4, min_new_tokens=3)
    answers = out[:, 2:]
    assert answers.shape == (2, 4)
    assert not (answers[:, :3] == EOS).any() and (answers[:, 3] == EOS).all()


def test_temperature_scales_the_logits_before_sampling():
    # two tokens with logits 0 and log(3): p = 3/4 at temperature 1, sqrt(3)/(1+sqrt(3)) = 0.634 at 2
    script = torch.full((1, 2, 6), float("-inf"))
    script[0, :, 2], script[0, :, 3] = 0.0, float(torch.log(torch.tensor(3.0)))
    script = script.expand(1, 2, 6)
    for temperature, expected in [(1.0, 0.75), (2.0, 3 ** 0.5 / (1 + 3 ** 0.5))]:
        torch.manual_seed(0)
        hits = 0
        for _ in range(2000):
            out, _ = run(script.clone(), max_new_tokens=1, temperature=temperature)
            hits += int((out[:, 2] == 3).sum())
        assert abs(hits / 4000 - expected) < 0.03


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.95, 1.0])
def test_top_p_filter_matches_transformers(top_p):
    scores = torch.randn(4, 37, generator=torch.Generator().manual_seed(1)) * 3  # [B, V], V odd
    scores[0, 5] = float("-inf")  # a masked entry stays masked
    expected = TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(top_p_filter(scores, top_p), expected)
    kept = top_p_filter(scores, top_p).isfinite()
    assert kept.any(dim=-1).all()  # the most likely token always survives


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        run(one_hot_logits([[2, 2]]), max_new_tokens=1, temperature=0.0)

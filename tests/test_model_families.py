"""The architecture matrix: RoleModel over tiny random models of the families users bring, NF4 and
unquantized (issue 13 point 3, issue 18). Built in tests/model_families.py; one RoleModel per
(family, quantization), shared by the checks below.

Per family: four roles load; the fused log-probs equal log_softmax of the model's own logits (its
logit transform included); an SFT-style backward reaches the policy adapter only; the row-mixed
forward equals separate forwards in values and gradients; a saved role reloads with plain peft on
the unmodified base to the same logits, without a warning; the sampler draws what `generate` draws.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from rlhf.errors import ModelError
from rlhf.models import ModelConfig, RoleModel
from rlhf.models.logit_transform import apply_logit_transform
from tests.model_families import FAMILIES, write_family_model
from tests.test_models import batch, generate, make_model, perturb

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

ATOL = {"none": 1e-5, "nf4": 1e-5}  # fp32 on CPU either way: the same math, another kernel order
ROLES = ("policy", "reference", "reward", "value")
CASES = [(family, quantization) for family in FAMILIES for quantization in ("none", "nf4")]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built = {}

    def make(family: str):
        if family not in built:
            built[family] = write_family_model(family, tmp_path_factory.mktemp(f"family-{family}"))
        return built[family]

    return make


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{q}" for f, q in CASES])
def case(request, family_dir):
    """(family, quantization, model_dir, RoleModel with four perturbed roles)."""
    family, quantization = request.param
    model_dir = family_dir(family)
    model = make_model(model_dir, quantization)
    for seed, role in enumerate(ROLES):
        perturb(model, role, seed)
    return family, quantization, model_dir, model


def clear_grads(model: RoleModel) -> None:
    for role in model.roles:
        for parameter in model.parameters(role):
            parameter.grad = None


def test_fused_logprobs_equal_the_models_logits(case):
    family, quantization, _, model = case
    input_ids, attention_mask = batch(seq_len=7)
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    temperature = 0.7
    with torch.no_grad():
        logprobs = model.token_logprobs("policy", input_ids, attention_mask, labels, temperature)  # [B, S]
        logits = model._causal_lm(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, S, V]
        expected = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
        scores = model.reward_scores("reward", input_ids, attention_mask)  # [B]
        values = model.values("value", input_ids, attention_mask)  # [B, S]
    torch.testing.assert_close(logprobs, expected, atol=ATOL[quantization], rtol=0)
    assert torch.isfinite(scores).all() and values.shape == input_ids.shape


def test_sft_style_backward_reaches_the_policy_only(case):
    _, _, _, model = case
    clear_grads(model)
    input_ids, attention_mask = batch(seq_len=7)
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    loss = -model.token_logprobs("policy", input_ids, attention_mask, labels).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters("policy")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for role in ("reference", "reward", "value") for p in model.parameters(role))
    clear_grads(model)


def test_parts_in_one_forward_match_separate_forwards(case):
    # OPT's fc1/fc2 see [B * S, H], Qwen3-MoE's shared layers [B, S, H]: both split by rows
    _, quantization, _, model = case
    input_ids, attention_mask = batch(batch_size=2, seq_len=8)
    attention_mask[0, :2] = False  # a left-padded row
    ptx_ids, ptx_mask = batch(batch_size=2, seq_len=7, seed=1)  # a bit shorter: padded into the stack
    parts = [("policy", input_ids, attention_mask), ("value", input_ids, attention_mask), ("policy", ptx_ids, ptx_mask)]
    weights = torch.randn(model._hidden_size, generator=torch.Generator().manual_seed(0))  # [H]

    def run(one_forward: bool):
        clear_grads(model)
        hidden = (model.hidden_states_of_parts(parts) if one_forward
                  else [model.hidden_states(role, ids, mask) for role, ids, mask in parts])
        loss = sum((h[mask] @ weights).square().mean() * (i + 1)
                   for i, (h, (_, _, mask)) in enumerate(zip(hidden, parts)))
        loss.backward()
        grads = [p.grad.clone() for role in ("policy", "value") for p in model.parameters(role) if p.grad is not None]
        return [h.detach() for h in hidden], grads

    separate, separate_grads = run(False)
    forwards = []
    handle = model._decoder.register_forward_hook(lambda *args: forwards.append(1))
    together, together_grads = run(True)
    handle.remove()
    clear_grads(model)
    assert len(forwards) == 1 and not model._row_mixing_failed  # really one forward, no fallback
    for a, b, (_, _, mask) in zip(together, separate, parts):
        torch.testing.assert_close(a[mask], b[mask], atol=ATOL[quantization], rtol=0)
    assert len(together_grads) == len(separate_grads) > 0
    for a, b in zip(together_grads, separate_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def test_saved_role_reloads_with_plain_peft_to_the_same_logits(case, tmp_path):
    family, quantization, model_dir, model = case
    model.save_role("policy", tmp_path / "policy")
    kwargs = {"local_files_only": True, "dtype": torch.float32}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    for module in base.modules():  # the one CPU NF4 path RoleModel uses (see base._keep_one_cpu_nf4_path)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "policy")
    assert not [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    input_ids, attention_mask = batch(seq_len=7)
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, S, V0]
        hidden = model.hidden_states("policy", input_ids, attention_mask)  # [B, S, H]
    ours = hidden @ model.lm_head_weight.T  # [B, S, V] (V > V0 where a pad row was added)
    if model.lm_head_bias is not None:
        ours = ours + model.lm_head_bias
    ours = apply_logit_transform(ours, **model.logit_transform)[..., :theirs.shape[-1]]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if family == "gpt2":  # Conv1D: the saved config fits the unquantized layout, whatever we trained over
        assert json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_sampler_draws_what_generate_draws(case):
    _, _, _, model = case
    pad_id = model.tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad_id, pad_id, 10, 11, 12], [20, 21, 22, 23, 24]])  # [B, P], left-padded
    prompt_mask = prompt_ids != pad_id  # [B, P]
    for seed, temperature in [(0, 1.0), (1, 0.7)]:
        torch.manual_seed(seed)
        ours = model.sample("policy", prompt_ids, prompt_mask, 6, temperature)  # [B, P + T]
        torch.manual_seed(seed)
        theirs = generate(model, "policy", prompt_ids, prompt_mask, max_new_tokens=6, temperature=temperature)
        assert torch.equal(ours, theirs), seed


# ---- what the matrix does not show on its own --------------------------------------------------------


def test_a_logit_transform_we_do_not_reproduce_is_refused_at_load(family_dir, monkeypatch):
    # as if Cohere's logit_scale were unknown to us: its logits are no longer hidden @ W.T
    monkeypatch.setattr("rlhf.models.roles.logit_transform_of", lambda config: {})
    with pytest.raises(ModelError, match=r"model type 'cohere' is not supported: its logits are not the LM head"):
        RoleModel(ModelConfig(path=str(family_dir("cohere")), quantization="none"))


def test_moe_preset_adapts_attention_and_trains_with_dropout(family_dir):
    # "all-linear" would wrap Qwen3-MoE's expert parameters, which peft refuses with lora_dropout != 0
    model = RoleModel(ModelConfig(path=str(family_dir("qwen3_moe")), quantization="none", lora_dropout=0.2))
    model.add_role("policy", trainable=True)
    assert set(model._peft_model.peft_config["policy"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    input_ids, attention_mask = batch(seq_len=6)
    model.token_logprobs("policy", input_ids, attention_mask, input_ids).sum().backward()
    assert all(p.grad is not None for p in model.parameters("policy"))


def test_moe_experts_adapted_only_when_named(family_dir, tmp_path):
    # experts named by the user go to peft's target_parameters; they take no dropout, and the
    # row-mixed forward falls back to one forward per role (the expert update is not a Linear's)
    model_dir = family_dir("qwen3_moe")
    with pytest.raises(ModelError, match=r"model\.target_modules names expert parameters \['experts\.gate_up_proj'\], "
                                         r"which peft adapts without dropout: set model\.lora_dropout 0"):
        make_model(model_dir, roles=("policy",), target_modules=["q_proj", "experts.gate_up_proj"], lora_dropout=0.1)
    model = make_model(model_dir, roles=("policy", "value"), target_modules=["q_proj", "experts.gate_up_proj"])
    for seed, role in enumerate(("policy", "value")):
        perturb(model, role, seed)
    assert set(model._peft_model.peft_config["policy"].target_parameters) == {"experts.gate_up_proj"}
    assert not {"policy", "value"} & model._row_mixable
    input_ids, attention_mask = batch(seq_len=6)
    parts = [("policy", input_ids, attention_mask), ("value", input_ids, attention_mask)]
    with torch.no_grad():
        together = model.hidden_states_of_parts(parts)
        separate = [model.hidden_states(role, ids, mask) for role, ids, mask in parts]
        bare = model.hidden_states(None, input_ids, attention_mask)
    assert all(torch.equal(a, b) for a, b in zip(together, separate))
    assert not torch.allclose(separate[0], bare)
    model.save_role("policy", tmp_path / "policy")  # and it reloads, with the same options accepted
    reloaded = make_model(model_dir, roles=(), target_modules=["q_proj", "experts.gate_up_proj"])
    reloaded.add_role("policy", adapter_dir=tmp_path / "policy")
    with torch.no_grad():
        assert torch.equal(reloaded.hidden_states("policy", input_ids, attention_mask), separate[0])


# ---- the stages end to end, for every family, NF4 and unquantized ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family, quantization", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_sft_rm_ppo_ptx_eval_run_on_the_family(family, quantization, family_dir, quick_toy_world, tmp_path):
    # a step or two of every stage on the family's tiny model and the toy world's data (words the tiny
    # vocabulary lacks become <unk>): OPT and Qwen3-MoE exercise the row-mixed PPO update, GPT-2 the
    # Conv1D save, Gemma 2/3, Cohere and Granite their logit transform in rollout, update and eval
    import math

    from rlhf.config import load_config
    from rlhf.pipeline import PipelineConfig
    from rlhf.pipeline import run as run_pipeline
    from tests.test_ppo_stage import PIPELINE_OVERRIDES

    world = quick_toy_world
    overrides = {**PIPELINE_OVERRIDES, "quantization": quantization, "out_dir": str(tmp_path / "run"),
                 "model_path": str(family_dir(family)), "rm_labels": "file", "data.sft": str(world.sft),
                 "data.rankings": str(world.rankings), "data.prompts": str(world.prompts),
                 "data.pretrain": str(world.pretrain), "ppo.iterations": 1}
    result = run_pipeline(load_config(PipelineConfig, overrides=overrides))
    for stage in ("sft", "rm", "ppo", "ppo_ptx"):
        assert (tmp_path / "run" / stage / "DONE").is_file(), stage
    first_update = next(json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").open()
                        if "approx_kl" in line)
    assert first_update["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # rollout and update compute alike
    for name, row in result["policies"].items():
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), name


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_rollout_scoring_uses_the_models_logit_transform(family, family_dir):
    # the rollout's log-probs must be those of the distribution the sampler drew from
    from rlhf.ppo.rollout import sample, score

    model = make_model(family_dir(family), "none")
    perturb(model, "policy", seed=1)
    prompt_ids = torch.tensor([[10, 11, 12], [20, 21, 22]])  # [B, P]
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)  # [B, P]
    torch.manual_seed(0)
    rollout = score(model, sample(model, prompt_ids, prompt_mask, 4, 1.0, 1.0), temperature=1.0, micro_batch_size=2)
    labels = torch.roll(rollout.sequences, -1, dims=1)  # [B, S]
    with torch.no_grad():
        expected = model.token_logprobs("policy", rollout.sequences, rollout.attention_mask, labels)  # [B, S]
    expected = expected[:, 2:2 + rollout.answer_mask.shape[1]] * rollout.answer_mask  # [B, T]
    torch.testing.assert_close(rollout.logprobs * rollout.answer_mask, expected, atol=1e-5, rtol=0)

"""rlhf.models: one frozen base, LoRA roles over it, scalar heads, on tiny random local models (CPU).

Every test loads through the real path (`from_pretrained` on a saved directory, see conftest's
`tiny_model_dir`), quantized to NF4 by bitsandbytes or unquantized.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlhf.errors import ConfigError, ModelError
from rlhf.models import ModelConfig, RoleModel, last_true_index, load_tokenizer
from rlhf.models.sampling import check_left_padded

ATOL_FP32 = 1e-5  # fp32 CPU: same math in another order (padding, re-load) agrees to ~1e-6
ROLES = ("policy", "reference", "reward", "value")
HEADS = {"reward": "reward", "value": "value"}


def make_model(model_dir, quantization="none", roles=ROLES, **config_overrides) -> RoleModel:
    model = RoleModel(ModelConfig(path=str(model_dir), quantization=quantization, **config_overrides))
    for role in roles:
        model.add_role(role, trainable=role in ("policy", "value"), head=HEADS.get(role))
    return model


def perturb(model: RoleModel, role: str, seed: int) -> None:
    """Make a role's adapter (and head) differ from the base: random A and B (no longer B = 0),
    set from `seed` alone so two models perturbed alike are equal whatever their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters(role):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


# generate() arguments that leave softmax(logits / temperature) unchanged (see `generate` below)
UNSHAPED_SAMPLING = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
}


@torch.no_grad()
def generate(model: RoleModel, role, input_ids, attention_mask, **gen_kwargs) -> torch.Tensor:
    """transformers' `generate` through `role`, the reference RoleModel.sample is checked against.

    Defaults: sampling on, KV cache on, the tokenizer's pad and EOS ids, and no reshaping of the
    distribution (transformers would apply its global top_k=50 and the model's shipped
    generation_config otherwise). Any `generate` argument overrides these.
    """
    check_left_padded(attention_mask, "generate")
    if role is not None:
        model._role(role)
    model._switch.activate(role)
    model._switch.set_training(False)
    gen_kwargs.setdefault("do_sample", True)
    if gen_kwargs["do_sample"]:
        for name, neutral_value in UNSHAPED_SAMPLING.items():
            gen_kwargs.setdefault(name, neutral_value)
    gen_kwargs.setdefault("pad_token_id", model.tokenizer.pad_token_id)
    gen_kwargs.setdefault("eos_token_id", model.tokenizer.eos_token_id)
    gen_kwargs.setdefault("use_cache", True)
    return model._causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask.to(torch.long), **gen_kwargs)


def add_role_copy(model: RoleModel, source: str, name: str, directory, trainable: bool = False) -> None:
    """Add role `name` as a copy of `source` (adapter and head) through its saved directory, as PPO
    starts the value function from the RM."""
    model.save_role(source, directory)
    kind = "value" if model.head(source) is not None else None
    model.add_role(name, adapter_dir=directory, trainable=trainable, head=kind)


def batch(vocab_low=4, vocab_high=50, batch_size=3, seq_len=9, seed=0):
    """Random token ids and an all-True mask: [B, S] each."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_low, vocab_high, (batch_size, seq_len), generator=generator)  # [B, S]
    return input_ids, torch.ones_like(input_ids, dtype=torch.bool)


def base_storage(model: RoleModel) -> dict[int, int]:
    """data_ptr -> bytes of every distinct storage behind the base's (non-LoRA) parameters and buffers."""
    causal_lm = model._causal_lm
    tensors = [t for name, t in causal_lm.named_parameters() if "lora_" not in name]
    tensors += [t for name, t in causal_lm.named_buffers() if "lora_" not in name]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


# ---- config and loading errors -------------------------------------------------------------------


def test_config_defaults_validate():
    ModelConfig(path="some/dir").validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"path": 3}, r"model\.path must be a string"),
        ({"quantization": "int3"}, r"model\.quantization must be 'nf4' or 'none', got 'int3'"),
        ({"lora_r": 0}, r"model\.lora_r must be an integer >= 1, got 0"),
        ({"lora_alpha": -1.0}, r"model\.lora_alpha must be a number > 0"),
        ({"lora_dropout": 1.0}, r"model\.lora_dropout must be in \[0, 1\)"),
        ({"target_modules": "some"}, r"model\.target_modules must be 'auto', 'all-linear' or a list"),
        ({"target_modules": []}, r"model\.target_modules must be .* non-empty list"),
        ({"gradient_checkpointing": "yes"}, r"model\.gradient_checkpointing must be true or false"),
        ({"compute_dtype": "fp8"}, r"model\.compute_dtype must be one of .*got 'fp8'"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    cfg = ModelConfig(path="some/dir")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_bad_quantization_is_refused_before_loading(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model\.quantization must be 'nf4' or 'none', got 'int3'"):
        RoleModel(ModelConfig(path=str(tiny_model_dir("llama")), quantization="int3"))


def test_missing_model_path(tmp_path):
    missing = tmp_path / "nowhere"
    message = rf"model path '{missing}' does not exist \(expected a local Hugging Face model directory"
    with pytest.raises(ModelError, match=message):
        load_tokenizer(missing)
    with pytest.raises(ModelError, match=message):
        RoleModel(ModelConfig(path=str(missing), quantization="none"))
    with pytest.raises(ModelError, match=r"model\.path is required"):
        RoleModel(ModelConfig(path="", quantization="none"))


def test_dir_without_config_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=r"has no config\.json"):
        RoleModel(ModelConfig(path=str(tmp_path), quantization="none"))


def test_role_errors(tiny_model_dir, tmp_path):
    model = make_model(tiny_model_dir("llama"), roles=("policy",))
    input_ids, attention_mask = batch()
    with pytest.raises(ModelError, match=r"unknown role 'critic' \(roles added: policy\)"):
        model.hidden_states("critic", input_ids, attention_mask)
    with pytest.raises(ModelError, match=r"role 'policy' already exists"):
        model.add_role("policy")
    with pytest.raises(ModelError, match=r"head must be one of 'reward', 'value' or None, got 'critic'"):
        model.add_role("reward", head="critic")
    with pytest.raises(ModelError, match=r"role 'policy' has no scalar head"):
        model.reward_scores("policy", input_ids, attention_mask)
    with pytest.raises(ModelError, match=r"has no adapter_config\.json"):
        model.add_role("reward", adapter_dir=tmp_path)
    with pytest.raises(ValueError, match=r"left-padded"):
        right_padded = attention_mask.clone()
        right_padded[0, -1] = False
        model.sample("policy", input_ids, right_padded, max_new_tokens=1)


# ---- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,vocab_slack", [("gpt2", 0), ("qwen2", 8)])
def test_tokenizer_without_pad_pads_with_eos_and_the_base_keeps_its_shape(tiny_model_dir, arch, vocab_slack):
    # no token is added and nothing is resized: an added pad row would enter the LM head's softmax
    model_dir = tiny_model_dir(arch, with_pad=False, vocab_slack=vocab_slack)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    config_rows = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    model = make_model(model_dir, roles=("policy",))
    assert len(model.tokenizer) == len(tokenizer) and model.lm_head_weight.shape[0] == config_rows
    if arch == "gpt2":  # tied embeddings stay tied
        assert model._causal_lm.get_input_embeddings().weight.data_ptr() == model.lm_head_weight.data_ptr()
    input_ids, attention_mask = batch()
    input_ids[:, :2] = tokenizer.pad_token_id
    attention_mask[:, :2] = False
    assert torch.isfinite(model.hidden_states("policy", input_ids, attention_mask)).all()


def test_pad_equal_to_eos_is_kept(tiny_model_dir, tmp_path):
    # SmolLM2 and Qwen2-instruct ship pad == EOS; masks come from lengths, never from `ids != pad`
    source_dir = tiny_model_dir("llama")
    tokenizer = load_tokenizer(source_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((source_dir / "config.json").read_text())
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token_id == reloaded.eos_token_id and len(reloaded) == len(tokenizer)


# ---- the shared base ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_copy_of_the_base_whatever_the_number_of_roles(tiny_model_dir, arch, quantization):
    model = make_model(tiny_model_dir(arch), quantization, roles=("policy",))
    storage_one_role = base_storage(model)
    for role in ("reference", "reward", "value"):
        model.add_role(role, head=HEADS.get(role))
    input_ids, attention_mask = batch()
    for role in (*ROLES, None):  # switching role must not copy the base either
        model.hidden_states(role, input_ids, attention_mask)
    storage_four_roles = base_storage(model)
    assert storage_four_roles == storage_one_role  # same storages, same bytes
    # and none of the roles' own parameters live in the base's storage
    role_storage = {p.untyped_storage().data_ptr() for role in ROLES for p in model.parameters(role)}
    assert not role_storage & set(storage_one_role)
    if quantization == "nf4":
        assert any(type(p).__name__ == "Params4bit" for p in model._causal_lm.parameters())


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_four_roles_give_four_outputs_once_their_adapters_differ(tiny_model_dir, arch, quantization):
    model = make_model(tiny_model_dir(arch), quantization)
    for seed, role in enumerate(ROLES):
        perturb(model, role, seed)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        outputs = {role: model.hidden_states(role, input_ids, attention_mask) for role in (*ROLES, None)}
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not torch.allclose(outputs[first], outputs[second], atol=1e-3), (first, second)
    # the same role asked again, after the others, gives the same output: switching back is exact
    with torch.no_grad():
        assert torch.equal(model.hidden_states("policy", input_ids, attention_mask), outputs["policy"])


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_without_sft_adapter_is_the_bare_base(tiny_model_dir, arch, quantization):
    model = make_model(tiny_model_dir(arch), quantization)
    perturb(model, "policy", seed=1)  # another role's adapter must not leak into the reference
    input_ids, attention_mask = batch()
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    with torch.no_grad():
        reference = model.token_logprobs("reference", input_ids, attention_mask, labels)
        bare_base = model.token_logprobs(None, input_ids, attention_mask, labels)
    assert torch.equal(reference, bare_base)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_hidden_states_are_the_lm_head_input(tiny_model_dir, arch):
    # GPT-2 and the tiny Qwen2 tie the LM head to the embeddings; Llama's is separate
    model = make_model(tiny_model_dir(arch), roles=("policy",))
    perturb(model, "policy", seed=0)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        hidden = model.hidden_states("policy", input_ids, attention_mask)  # [B, S, H]
        logits = model._causal_lm(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, S, V]
    head_logits = hidden @ model.lm_head_weight.T  # [B, S, V]
    if model.lm_head_bias is not None:
        head_logits = head_logits + model.lm_head_bias
    torch.testing.assert_close(head_logits, logits, atol=ATOL_FP32, rtol=0)


def test_token_logprobs_match_log_softmax_of_the_logits(tiny_model_dir):
    model = make_model(tiny_model_dir("llama"), roles=("policy",))
    perturb(model, "policy", seed=0)
    input_ids, attention_mask = batch()
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    labels[:, -1] = -100
    temperature = 0.7
    with torch.no_grad():
        logprobs = model.token_logprobs("policy", input_ids, attention_mask, labels, temperature)  # [B, S]
        logits = model._causal_lm(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, S, V]
    expected = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, S, V]
    expected = expected.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, S]
    expected[:, -1] = 0.0  # ignore_index gives 0
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, expected, atol=ATOL_FP32, rtol=0)


def test_base_dropout_is_off_even_in_train_mode(tiny_model_dir):
    # the tiny GPT-2 keeps GPT-2's 0.1 residual, attention and embedding dropouts in its config
    model = make_model(tiny_model_dir("gpt2"), roles=("policy",))
    input_ids, attention_mask = batch()
    first = model.hidden_states("policy", input_ids, attention_mask)  # grad on: train mode
    second = model.hidden_states("policy", input_ids, attention_mask)
    assert model._causal_lm.training
    assert torch.equal(first, second)


# ---- trainable flags -----------------------------------------------------------------------------


def _flags(model: RoleModel) -> dict[str, set[bool]]:
    return {role: {p.requires_grad for p in model.parameters(role)} for role in model.roles}


def test_trainable_flags_survive_switching(tiny_model_dir, tmp_path):
    model = make_model(tiny_model_dir("llama"))
    expected = {"policy": {True}, "reference": {False}, "reward": {False}, "value": {True}}
    assert _flags(model) == expected
    input_ids, attention_mask = batch()
    # peft's set_adapter would leave only the active adapter trainable after each of these
    for role in ("reward", None, "reference", "value", "policy", None, "reward"):
        model.hidden_states(role, input_ids, attention_mask)
        assert _flags(model) == expected, role
    with model.use("reference"):
        assert _flags(model) == expected
    model.save_role("reward", tmp_path / "reward")
    add_role_copy(model, "reward", "reward_copy", tmp_path / "reward_copy")
    assert _flags(model) == {**expected, "reward_copy": {False}}
    assert not any(p.requires_grad for name, p in model._causal_lm.named_parameters() if "lora_" not in name)

    # a policy loss and a value loss reach only their own role's parameters
    loss = model.token_logprobs("policy", input_ids, attention_mask, input_ids).sum()
    loss = loss + model.values("value", input_ids, attention_mask).sum()
    loss.backward()
    for role in model.roles:
        has_grad = {p.grad is not None for p in model.parameters(role)}
        assert has_grad == ({True} if role in ("policy", "value") else {False}), role


def test_gradient_checkpointing_recomputes_with_the_forward_role(tiny_model_dir):
    # policy forward, then value forward, then one backward: the checkpointed policy layers are
    # recomputed while "value" is active, and must still use the policy adapter
    grads = {}
    for checkpointing in (False, True):
        model = make_model(tiny_model_dir("llama"), gradient_checkpointing=checkpointing)
        for seed, role in enumerate(ROLES):
            perturb(model, role, seed)
        input_ids, attention_mask = batch()
        loss = model.token_logprobs("policy", input_ids, attention_mask, input_ids).sum()
        loss = loss + model.values("value", input_ids, attention_mask).square().sum()
        loss.backward()
        grads[checkpointing] = [p.grad.clone() for role in ("policy", "value") for p in model.parameters(role)]
    for without, with_checkpointing in zip(grads[False], grads[True]):
        torch.testing.assert_close(with_checkpointing, without, atol=1e-5, rtol=1e-4)


# ---- heads -----------------------------------------------------------------------------------------


def test_last_true_index_under_both_paddings():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert last_true_index(right).tolist() == [2, 3, 0]
    assert last_true_index(left).tolist() == [3, 3, 3]
    # documented: a row with no True gives 0 (integer and float {0, 1} masks read as bool)
    assert last_true_index(torch.tensor([[0, 0, 0], [0, 1, 0]])).tolist() == [0, 1]
    assert last_true_index(torch.tensor([[0.0, 0.0], [1.0, 0.0]])).tolist() == [0, 0]


def test_reward_score_of_an_empty_row_is_refused(tiny_model_dir):
    model = make_model(tiny_model_dir("llama"), roles=("reward",))
    input_ids, attention_mask = batch()
    attention_mask[1] = False
    with pytest.raises(ValueError, match=r"a row of attention_mask has no real token"):
        model.reward_scores("reward", input_ids, attention_mask)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_score_reads_the_last_real_token_under_left_and_right_padding(tiny_model_dir, arch, quantization):
    model = make_model(tiny_model_dir(arch), quantization, roles=("reward",))
    perturb(model, "reward", seed=3)
    model.head("reward").offset.fill_(-0.5)
    pad_id = model.tokenizer.pad_token_id
    sequences = [[5, 9, 11, 30, 7], [12, 8, 3 + 4], [40, 41, 42, 43, 44, 45, 46]]
    seq_len = max(map(len, sequences))
    right_ids = torch.full((3, seq_len), pad_id)  # [B, S]
    left_ids = torch.full((3, seq_len), pad_id)  # [B, S]
    right_mask = torch.zeros(3, seq_len, dtype=torch.bool)  # [B, S]
    left_mask = torch.zeros(3, seq_len, dtype=torch.bool)  # [B, S]
    for row, tokens in enumerate(sequences):
        right_ids[row, : len(tokens)] = torch.tensor(tokens)
        right_mask[row, : len(tokens)] = True
        left_ids[row, seq_len - len(tokens) :] = torch.tensor(tokens)
        left_mask[row, seq_len - len(tokens) :] = True
    with torch.no_grad():
        right_scores = model.reward_scores("reward", right_ids, right_mask)  # [B]
        left_scores = model.reward_scores("reward", left_ids, left_mask)  # [B]
        alone = torch.cat([
            model.reward_scores("reward", torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.bool))
            for tokens in sequences
        ])  # [B]
        # by hand: the head on the hidden state of the last real token, plus the offset
        hidden = model.hidden_states("reward", right_ids, right_mask)  # [B, S, H]
        last_hidden = torch.stack([hidden[row, len(tokens) - 1] for row, tokens in enumerate(sequences)])  # [B, H]
        by_hand = model.head("reward").linear(last_hidden).squeeze(-1) - 0.5  # [B]
    assert right_scores.shape == (3,) and right_scores.dtype == torch.float32
    torch.testing.assert_close(right_scores, by_hand, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(left_scores, alone, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(right_scores, alone, atol=ATOL_FP32, rtol=0)


def test_values_are_per_token_and_a_fresh_value_head_predicts_zero(tiny_model_dir):
    model = make_model(tiny_model_dir("llama"), roles=("value",))
    input_ids, attention_mask = batch()
    values = model.values("value", input_ids, attention_mask)  # [B, S]
    assert values.shape == input_ids.shape and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros_like(values))


def test_the_value_function_starts_as_a_copy_of_the_reward_model(tiny_model_dir, tmp_path):
    # PPO adds "value" from the RM's directory (InstructGPT initialises the value function from the RM)
    model = make_model(tiny_model_dir("llama"), roles=("reward",))
    perturb(model, "reward", seed=2)
    model.head("reward").offset.fill_(0.25)
    model.save_role("reward", tmp_path / "rm")
    model.add_role("value", adapter_dir=tmp_path / "rm", trainable=True, head="value")
    input_ids, attention_mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model.values("value", input_ids, attention_mask), model.values("reward", input_ids, attention_mask)
        )
    # a copy, not an alias: training the value function leaves the RM alone
    assert all(p.requires_grad for p in model.parameters("value"))
    assert not any(p.requires_grad for p in model.parameters("reward"))
    value_ptrs = {p.data_ptr() for p in model.parameters("value")}
    assert not value_ptrs & {p.data_ptr() for p in model.parameters("reward")}


# ---- save / load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_save_and_load_round_trip(tiny_model_dir, tmp_path, quantization):
    model_dir = tiny_model_dir("llama")
    model = make_model(model_dir, quantization, roles=("policy", "reward"))
    perturb(model, "policy", seed=4)
    perturb(model, "reward", seed=5)
    model.head("reward").offset.fill_(-1.5)
    model.save_role("policy", tmp_path / "policy")
    model.save_role("reward", tmp_path / "reward")
    assert not (tmp_path / "policy" / "head.safetensors").exists()
    assert {p.name for p in (tmp_path / "reward").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "head.safetensors"
    }

    reloaded = RoleModel(ModelConfig(path=str(model_dir), quantization=quantization))
    reloaded.add_role("policy", adapter_dir=tmp_path / "policy", trainable=True)
    reloaded.add_role("reward", adapter_dir=tmp_path / "reward", head="reward")
    input_ids, attention_mask = batch()
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    with torch.no_grad():
        assert torch.equal(
            reloaded.token_logprobs("policy", input_ids, attention_mask, labels),
            model.token_logprobs("policy", input_ids, attention_mask, labels),
        )
        assert torch.equal(
            reloaded.reward_scores("reward", input_ids, attention_mask),
            model.reward_scores("reward", input_ids, attention_mask),
        )
    assert all(p.requires_grad for p in reloaded.parameters("policy"))
    assert not any(p.requires_grad for p in reloaded.parameters("reward"))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's own, see roles.py
def test_saved_adapter_loads_with_plain_peft(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("gpt2")
    model = make_model(model_dir, roles=("reference", "policy"))
    perturb(model, "policy", seed=6)
    model.save_role("policy", tmp_path / "policy")

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "policy")
    input_ids, attention_mask = batch()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, S, V]
        hidden = model.hidden_states("policy", input_ids, attention_mask)  # [B, S, H]
    torch.testing.assert_close(hidden @ model.lm_head_weight.T, peft_logits, atol=ATOL_FP32, rtol=0)


def test_head_requested_on_a_dir_without_one_starts_fresh(tiny_model_dir, tmp_path):
    # the RM starts from the SFT adapter, whose directory has no head
    model = make_model(tiny_model_dir("llama"), roles=("policy",))
    perturb(model, "policy", seed=7)
    model.save_role("policy", tmp_path / "sft")
    model.add_role("reward", adapter_dir=tmp_path / "sft", trainable=True, head="reward")
    assert model.head("reward").offset.item() == 0.0
    input_ids, attention_mask = batch()
    with torch.no_grad():
        assert torch.equal(
            model.hidden_states("reward", input_ids, attention_mask),
            model.hidden_states("policy", input_ids, attention_mask),
        )


# ---- generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_samples_from_the_role_with_left_padded_prompts(tiny_model_dir, arch):
    model = make_model(tiny_model_dir(arch), roles=("reference", "policy"))
    perturb(model, "policy", seed=8)
    pad_id = model.tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad_id, pad_id, 10, 11, 12], [20, 21, 22, 23, 24]])  # [B, P], left-padded
    prompt_mask = prompt_ids != pad_id  # [B, P]
    new_tokens = 4
    sequences = generate(
        model, "policy", prompt_ids, prompt_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )  # [B, P + T]
    assert sequences.shape == (2, 5 + new_tokens)
    assert torch.equal(sequences[:, :5], prompt_ids)
    # greedy decoding by hand through hidden_states gives the same tokens: the policy adapter
    # was active in generate and positions agree with left padding
    ids, mask = prompt_ids, prompt_mask
    eos_id = model.tokenizer.eos_token_id
    with torch.no_grad():
        for _ in range(new_tokens):
            hidden = model.hidden_states("policy", ids, mask)[:, -1]  # [B, H]
            logits = hidden @ model.lm_head_weight.T  # [B, V]
            logits[:, eos_id] = float("-inf")  # min_new_tokens forbids EOS
            next_ids = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
            ids = torch.cat([ids, next_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids, dtype=torch.bool)], dim=1)
    assert torch.equal(sequences, ids)


def test_nf4_scoring_without_grad_matches_the_training_forward(tiny_model_dir):
    # rollout scoring (eval, no grad) then a PPO update (train, grad) through the same NF4 layers:
    # both must take one numeric path, and gradients must still reach the first layer's adapter
    model = make_model(tiny_model_dir("llama"), "nf4", roles=("policy",))
    perturb(model, "policy", seed=9)
    input_ids, attention_mask = batch()
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    storage_before = base_storage(model)
    with torch.no_grad():
        old_logprobs = model.token_logprobs("policy", input_ids, attention_mask, labels)  # [B, S]
    logprobs = model.token_logprobs("policy", input_ids, attention_mask, labels)  # [B, S]
    assert torch.equal(logprobs.detach(), old_logprobs)
    assert base_storage(model) == storage_before
    logprobs.sum().backward()
    first_layer_lora = [p for n, p in model._causal_lm.named_parameters() if "layers.0." in n and "lora_A" in n]
    assert first_layer_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_layer_lora)


def test_sampling_distribution_is_the_one_token_logprobs_recomputes(tiny_model_dir):
    # a shipped generation_config that reshapes sampling (as Qwen2's does) must not leak into rollouts
    model = make_model(tiny_model_dir("llama"), roles=("policy",))
    perturb(model, "policy", seed=10)
    shipped = model._causal_lm.generation_config
    shipped.top_k, shipped.top_p, shipped.temperature, shipped.repetition_penalty = 3, 0.5, 0.3, 1.3
    temperature = 0.7
    prompt_ids = torch.tensor([[10, 11, 12], [20, 21, 22]])  # [B, P]
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)  # [B, P]
    torch.manual_seed(0)
    output = generate(
        model, "policy", prompt_ids, prompt_mask, max_new_tokens=3, min_new_tokens=3, temperature=temperature,
        output_logits=True, output_scores=True, return_dict_in_generate=True,
    )
    sequences = output.sequences  # [B, P + T]
    labels = sequences[:, 1:]  # [B, S - 1]
    mask = torch.ones_like(sequences, dtype=torch.bool)[:, :-1]  # [B, S - 1]
    with torch.no_grad():
        logprobs = model.token_logprobs("policy", sequences[:, :-1], mask, labels, temperature)  # [B, S - 1]
    eos_id = model.tokenizer.eos_token_id
    for step, scores in enumerate(output.scores):  # scores: [B, V] after every logits processor
        scores = scores.clone()
        scores[:, eos_id] = output.logits[step][:, eos_id] / temperature  # undo min_new_tokens' EOS ban
        sampled = sequences[:, 3 + step]  # [B]
        sampled_logprobs = torch.log_softmax(scores, dim=-1).gather(-1, sampled[:, None]).squeeze(-1)  # [B]
        torch.testing.assert_close(sampled_logprobs, logprobs[:, 2 + step], atol=ATOL_FP32, rtol=0)


def test_partial_adapter_file_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(tiny_model_dir("llama"), roles=("policy",))
    model.save_role("policy", tmp_path / "policy")
    weights_path = tmp_path / "policy" / "adapter_model.safetensors"
    weights = load_file(weights_path)
    weights.pop(next(iter(weights)))
    save_file(weights, weights_path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"1 adapter tensors are missing"):
        model.add_role("reference", adapter_dir=tmp_path / "policy")
    assert model.roles == ("policy",)
    model.save_role("policy", tmp_path / "policy")  # a whole file again: the name is free to use
    model.add_role("reference", adapter_dir=tmp_path / "policy")
    input_ids, attention_mask = batch()
    with torch.no_grad():
        assert torch.equal(
            model.hidden_states("reference", input_ids, attention_mask),
            model.hidden_states("policy", input_ids, attention_mask),
        )


def test_loaded_adapter_takes_this_runs_lora_dropout(tiny_model_dir, tmp_path):
    # SFT saves its adapter with dropout 0.2; PPO loads it with dropout 0 so the training forward
    # reproduces the rollout's log-probs (a ratio of exactly 1 before the first update)
    sft = make_model(tiny_model_dir("llama"), roles=("policy",), lora_dropout=0.2)
    perturb(sft, "policy", seed=3)
    sft.save_role("policy", tmp_path / "policy")
    ppo = RoleModel(ModelConfig(path=str(tiny_model_dir("llama")), quantization="none"))
    ppo.add_role("policy", tmp_path / "policy", trainable=True)
    input_ids, attention_mask = batch()
    labels = torch.roll(input_ids, -1, dims=1)  # [B, S]
    with torch.no_grad():
        old_logprobs = ppo.token_logprobs("policy", input_ids, attention_mask, labels)  # [B, S]
    assert torch.equal(ppo.token_logprobs("policy", input_ids, attention_mask, labels).detach(), old_logprobs)
    sft_train = sft.token_logprobs("policy", input_ids, attention_mask, labels).detach()
    assert not torch.equal(sft_train, old_logprobs)  # the SFT run itself still trains with its dropout


def test_fast_role_switch_matches_peft_set_adapter(tiny_model_dir):
    # _activate flips the LoRA layers' flags directly instead of peft's set_adapter walk over every
    # module: the same outputs and the same trainable flags, in any order of roles
    model = make_model(tiny_model_dir("llama"))
    for seed, role in enumerate(ROLES):
        perturb(model, role, seed=seed)
    assert model._switch.lora_layers, "the fast switch should be in use with this peft"
    input_ids, attention_mask = batch()
    order = ["policy", "value", None, "reward", "policy", "reference", None, "value"]
    flags_before = _flags(model)
    with torch.no_grad():
        fast = [model.hidden_states(role, input_ids, attention_mask) for role in order]
        layers, model._switch.lora_layers = model._switch.lora_layers, []  # the public peft path
        slow = [model.hidden_states(role, input_ids, attention_mask) for role in order]
        model._switch.lora_layers = layers
    for role, a, b in zip(order, fast, slow):
        assert torch.equal(a, b), role
    assert not torch.equal(fast[0], fast[1]) and not torch.equal(fast[0], fast[2])
    assert _flags(model) == flags_before


@pytest.mark.parametrize("quantization, checkpointing", [("none", False), ("nf4", False), ("none", True)])
def test_parts_in_one_forward_match_separate_forwards(tiny_model_dir, tmp_path, quantization, checkpointing):
    # hidden_states_of_parts: rows through several roles in one pass (PPO's policy + value + ptx rows).
    # Values and gradients equal separate forwards, with gradient checkpointing too, for parts of
    # different lengths, and for a role whose adapter skips some projections (a q_proj-only run)
    only_q = make_model(tiny_model_dir("llama"), quantization, roles=(), target_modules=["q_proj"])
    only_q.add_role("narrow", trainable=True)
    perturb(only_q, "narrow", seed=7)
    only_q.save_role("narrow", tmp_path / "narrow")
    model = make_model(tiny_model_dir("llama"), quantization, gradient_checkpointing=checkpointing)
    model.add_role("narrow", adapter_dir=tmp_path / "narrow", trainable=True)
    for seed, role in enumerate(ROLES):
        perturb(model, role, seed)
    assert {"policy", "value", "narrow"} <= model._row_mixable
    input_ids, attention_mask = batch(batch_size=3, seq_len=9)
    attention_mask[0, :3] = False  # a left-padded row
    other_ids, other_mask = batch(batch_size=2, seq_len=8, seed=1)  # a bit shorter: right-padded in the stack
    other_mask[1, 4:] = False  # a right-padded row
    short_ids, short_mask = batch(batch_size=2, seq_len=4, seed=2)  # much shorter: a forward of its own
    weights = torch.randn(model._hidden_size, generator=torch.Generator().manual_seed(0))  # [H]
    roles = ("policy", "value", "narrow")
    parts = [("policy", input_ids, attention_mask), ("value", input_ids, attention_mask),
             ("narrow", input_ids, attention_mask), ("policy", other_ids, other_mask), ("value", short_ids, short_mask)]

    def loss_and_grads(one_forward: bool):
        for role in roles:
            for parameter in model.parameters(role):
                parameter.grad = None
        if one_forward:
            hidden = model.hidden_states_of_parts(parts)
        else:
            hidden = [model.hidden_states(role, ids, mask) for role, ids, mask in parts]
        loss = sum((h[mask] @ weights).square().mean() * (i + 1)
                   for i, (h, (_, _, mask)) in enumerate(zip(hidden, parts)))
        loss.backward()
        grads = [p.grad.clone() for role in roles for p in model.parameters(role) if p.grad is not None]
        return [h.detach() for h in hidden], grads

    separate, separate_grads = loss_and_grads(False)
    forwards = []
    handle = model._decoder.register_forward_hook(lambda module, args, output: forwards.append(1))
    together, together_grads = loss_and_grads(True)
    handle.remove()
    assert len(forwards) == 2  # the four parts of similar length together, the short one alone
    assert len(together_grads) == len(separate_grads) > 0
    for a, b, (_, _, mask) in zip(together, separate, parts):
        assert a.shape == b.shape
        torch.testing.assert_close(a[mask], b[mask], atol=ATOL_FP32, rtol=0)
    for a, b in zip(together_grads, separate_grads):  # fp32 sums over other row groupings: ~1e-6 of the scale
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)
    assert not torch.equal(together[0], together[1])
    # afterwards a plain forward is back to one role for all rows, and no LoRA layer keeps a hook
    with torch.no_grad():
        assert torch.equal(model.hidden_states("policy", input_ids, attention_mask), separate[0])
    assert not any(layer._forward_hooks for layer in model._switch.lora_layers)


def test_row_slices_of_stacked_and_flattened_layer_inputs():
    from rlhf.models.row_mixing import RowRoles, RowsNotAligned, _row_sizes

    rows = RowRoles((("policy", 0, 2), ("value", 2, 5)), seq_len=4)
    assert _row_sizes(rows, torch.zeros(5, 4, 8)) == [2, 3]  # [R, S, H]
    assert _row_sizes(rows, torch.zeros(20, 8)) == [8, 12]  # [R * S, H] (OPT's fc1/fc2)
    message = r"LoRA layer input \(7, 8\) is neither \[5, 4, \.\.\.\] nor \[20, \.\.\.\]"
    with pytest.raises(RowsNotAligned, match=message):
        _row_sizes(rows, torch.zeros(7, 8))  # tokens gathered per MoE expert


def test_parts_fall_back_to_separate_forwards_when_rows_are_not_aligned(tiny_model_dir, monkeypatch):
    # a LoRA layer whose input is not the stacked rows (an MoE expert's gathered tokens) cannot be
    # split by role: hidden_states_of_parts must give the separate forwards' result and stay usable
    from rlhf.models import adapter_switch
    from rlhf.models.row_mixing import RowsNotAligned

    model = make_model(tiny_model_dir("llama"))
    for seed, role in enumerate(ROLES):
        perturb(model, role, seed)
    input_ids, attention_mask = batch()
    parts = [("policy", input_ids, attention_mask), ("value", input_ids, attention_mask)]
    with torch.no_grad():
        separate = [model.hidden_states(role, ids, mask) for role, ids, mask in parts]

    def misaligned(rows, layer, x, output):
        raise RowsNotAligned("gathered tokens")

    monkeypatch.setattr(adapter_switch, "add_row_deltas", misaligned)
    with torch.no_grad():
        together = model.hidden_states_of_parts(parts)
    assert model._row_mixing_failed
    for a, b in zip(together, separate):
        assert torch.equal(a, b)
    assert not any(layer._forward_hooks for layer in model._switch.lora_layers)
    with torch.no_grad():
        assert torch.equal(model.hidden_states("policy", input_ids, attention_mask), separate[0])


@pytest.mark.parametrize("option, value, message", [
    ("lora_r", 4, r"model\.lora_r=4 cannot apply to the adapter loaded from '.*sft', which keeps its own values "
                  r"\(r=16, lora_alpha=32, target_modules=\['down_proj', .*\]\); drop the option or give those values"),
    ("lora_alpha", 8.0, r"model\.lora_alpha=8\.0 cannot apply to the adapter loaded from"),
    ("target_modules", ["q_proj"], r"model\.target_modules=\['q_proj'\] cannot apply to the adapter loaded from"),
])
def test_lora_options_that_cannot_apply_to_a_loaded_adapter_are_refused(tiny_model_dir, tmp_path, option, value,
                                                                        message):
    # an RM or PPO run with --model.lora_r 4 over an r=16 SFT adapter would otherwise train r=16 silently
    make_model(tiny_model_dir("llama"), roles=("policy",)).save_role("policy", tmp_path / "sft")
    later = RoleModel(ModelConfig(path=str(tiny_model_dir("llama")), quantization="none", **{option: value}))
    with pytest.raises(ModelError, match=message):
        later.add_role("reward", adapter_dir=tmp_path / "sft", head="reward")
    later.add_role("fresh")  # a fresh role takes the options
    config = later._peft_model.peft_config["fresh"]
    assert {"lora_r": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules)}[option] == value


def test_lora_options_equal_to_the_adapters_own_are_accepted(tiny_model_dir, tmp_path):
    # a pipeline passes the SFT run's options to every stage
    options = dict(lora_r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"])
    make_model(tiny_model_dir("llama"), roles=("policy",), **options).save_role("policy", tmp_path / "sft")
    later = RoleModel(ModelConfig(path=str(tiny_model_dir("llama")), quantization="none", **options))
    later.add_role("reward", adapter_dir=tmp_path / "sft", head="reward")
    assert later._peft_model.peft_config["reward"].r == 4

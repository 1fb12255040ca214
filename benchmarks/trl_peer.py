"""The TRL peer of benchmarks/ppo_step.py: trl==1.12.0 `trl.experimental.ppo.PPOTrainer` at ppo_step's settings.

Run by ppo_step.py as `benchmarks/.venv-trl/bin/python -m benchmarks.trl_peer` from the repository
root (the venv made by benchmarks/setup_trl_venv.sh); reads the
settings JSON ppo_step wrote and writes a result JSON of the same form as ours.

Closest configuration TRL can express to ours (what differs is said in the table):
- policy: the base (NF4 via BitsAndBytesConfig when ours is NF4) + LoRA through PPOTrainer's
  `peft_config` (same rank, alpha = 2r, dropout 0, the same target modules); reference = the policy
  with its adapter disabled (TRL's peft path, ref_model=None);
- reward and value: AutoModelForSequenceClassification(num_labels=1), each its own copy of the base
  (TRL takes separate models; it cannot share one base between four roles), with a LoRA adapter of
  the same rank injected in place (peft.inject_adapter_in_model, so TRL's get_reward still finds the
  backbone and `score`): value trains its adapter and score head, reward is frozen;
- no ptx term (TRL's PPO has none); value not initialised from the RM (separate random heads here,
  which does not change the cost);
- every answer exactly response_length tokens: TRL's GenerationConfig gets min_new_tokens =
  max_new_tokens (stop_token None, so TRL does not truncate either);
- one mini-batch per PPO epoch (num_mini_batches 1, per_device_train_batch_size = mini batch,
  gradient_accumulation_steps = mini / micro), temperature 1, top_k 0, top_p 1.
- `--no-gc`: the two per-iteration `gc.collect()` calls in TRL's train loop are removed by replacing
  the `gc` name in `trl.experimental.ppo.ppo_trainer` with a stub whose collect() does nothing.
- On CPU with NF4 the bitsandbytes AVX512-BF16 inference repack is turned off, as rlhf/models does
  for ours (base.py `_keep_one_cpu_nf4_path`): same Linear4bit kernels on both sides.
Timing: a TrainerCallback marks each iteration's end (on_step_end); the rollout phase is TRL's
`batch_generation`, the update phase starts at the first forward with grad enabled; "other" is the
rest of the iteration (the second gc.collect, data loading).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import types
from pathlib import Path

import torch

from benchmarks._common import percentile_summary, peak_rss_mib, prompt_texts, shape_from_json, write_json

LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(cls, settings, device, **kwargs):
    from transformers import BitsAndBytesConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    extra = {}
    if settings["quantization"] == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        extra["device_map"] = {"": device}
    model = cls.from_pretrained(settings["model_dir"], dtype=dtype, local_files_only=True, **kwargs, **extra)
    if settings["quantization"] == "none":
        model.to(device)
    for module in model.modules():  # same CPU NF4 path as ours (see the module docstring)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def lora_config(settings, task_type):
    from peft import LoraConfig

    r = settings["lora_r"]
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LLAMA_STYLE_TARGETS, bias="none",
                      task_type=task_type)


def scalar_model(settings, device, trainable: bool):
    from peft import inject_adapter_in_model
    from transformers import AutoModelForSequenceClassification

    model = load(AutoModelForSequenceClassification, settings, device, num_labels=1)
    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(settings, "SEQ_CLS"), model)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and ("lora_" in name or name.startswith("score")))
    if device.type == "cuda":
        model.score.to(torch.bfloat16)
    return model


def run(settings: dict, no_gc: bool) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    device = torch.device(settings["device"])
    on_gpu = device.type == "cuda"
    B, T, P = settings["batch"], settings["answer_len"], settings["prompt_len"]
    mini, micro = settings["mini_batch"], settings["micro_batch"]
    n_iter = settings["warmup"] + settings["iterations"]
    torch.manual_seed(0)

    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(settings["model_dir"], local_files_only=True)
    tokenizer.padding_side = "left"
    policy = load(AutoModelForCausalLM, settings, device)
    value_model = scalar_model(settings, device, trainable=True)
    reward_model = scalar_model(settings, device, trainable=False)
    load_s = time.perf_counter() - t_load

    if settings.get("prompt_ids"):  # --model: real prompts, tokenised once by the orchestrator (same rows as ours)
        ids = json.loads(Path(settings["prompt_ids"]).read_text())[:B * n_iter]
    else:
        vocab = shape_from_json(settings["shape"]).vocab
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(B * n_iter, P, vocab, seed=0)]
    assert all(len(x) == P for x in ids), "prompts must be exactly prompt_len tokens"
    dataset = Dataset.from_dict({"input_ids": ids})

    # --- instrumentation: fixed-length answers, phase timers, optional gc removal -------------------
    class FixedLengthGenerationConfig(GenerationConfig):
        def __init__(self, **kwargs):
            kwargs.setdefault("min_new_tokens", kwargs.get("max_new_tokens"))
            super().__init__(**kwargs)

    trl_ppo.GenerationConfig = FixedLengthGenerationConfig
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    marks: list[dict] = []
    current: dict = {}
    batch_generation, forward = trl_ppo.batch_generation, trl_ppo.forward

    def timed_batch_generation(*args, **kwargs):
        sync()
        current["rollout_start"] = time.perf_counter()
        out = batch_generation(*args, **kwargs)
        sync()
        current["rollout_end"] = time.perf_counter()
        if out[0].shape[1] != P + T:
            raise RuntimeError(f"expected {P + T} tokens per sequence, got {out[0].shape[1]}")
        return out

    def timed_forward(*args, **kwargs):
        if torch.is_grad_enabled() and "update_start" not in current:
            sync()
            current["update_start"] = time.perf_counter()
        return forward(*args, **kwargs)

    trl_ppo.batch_generation, trl_ppo.forward = timed_batch_generation, timed_forward
    if no_gc:
        trl_ppo.gc = types.SimpleNamespace(collect=lambda *args, **kwargs: 0)

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            current["previous_end"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            row = {"total_s": now - current["previous_end"],
                   "rollout_s": current["rollout_end"] - current["rollout_start"],
                   "score_s": current["update_start"] - current["rollout_end"],
                   "update_s": now - current["update_start"]}
            row["other_s"] = row["total_s"] - row["rollout_s"] - row["score_s"] - row["update_s"]
            marks.append(row)
            current.clear()
            current["previous_end"] = now

    with tempfile.TemporaryDirectory(prefix="trl-peer-") as out_dir:
        args = PPOConfig(
            output_dir=out_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=mini // micro,
            num_mini_batches=B // mini, num_ppo_epochs=settings["ppo_epochs"], response_length=T,
            total_episodes=B * n_iter, local_rollout_forward_batch_size=micro, num_sample_generations=0,
            stop_token=None, missing_eos_penalty=None, temperature=1.0, kl_coef=0.02, vf_coef=0.1, cliprange=0.2,
            cliprange_value=0.2, gamma=1.0, lam=0.95, learning_rate=2e-4, adam_epsilon=1e-5,
            lr_scheduler_type="constant",
            bf16=on_gpu, use_cpu=not on_gpu, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, seed=0, gradient_checkpointing=settings["gradient_checkpointing"],
            dataloader_num_workers=0)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                             eval_dataset=dataset, peft_config=lora_config(settings, "CAUSAL_LM"), callbacks=[Marks()])
        assert args.batch_size == B and args.local_mini_batch_size == mini, (args.batch_size,
                                                                             args.local_mini_batch_size)
        trainer.train()
    if len(marks) != n_iter:
        raise RuntimeError(f"expected {n_iter} iterations, TRL ran {len(marks)}")
    timed = marks[settings["warmup"]:]
    tokens = B * T
    out = {"load_s": load_s, "answer_tokens_per_iteration": tokens, "peak_rss_mib": peak_rss_mib(),
           "trl": trl.__version__, "no_gc": no_gc}
    for key in ("total_s", "rollout_s", "score_s", "update_s", "other_s"):
        out[key] = percentile_summary([row[key] for row in timed])
        out[key.replace("_s", "_tokens_per_s")] = tokens / out[key]["median"]
    if on_gpu:
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-gc", action="store_true", help="remove TRL's two per-iteration gc.collect() calls")
    args = parser.parse_args()
    settings = json.loads(Path(args.settings).read_text())
    torch.set_num_threads(settings["threads"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    write_json(Path(args.out), run(settings, args.no_gc))


if __name__ == "__main__":
    main()

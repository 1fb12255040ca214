"""How fast is one PPO-ptx iteration, where do its time and memory go, and how does it compare with
TRL's PPO trainer at the same settings?

A randomly initialised Llama/Qwen2 model of a named shape (`--shape`, see benchmarks/_common.py
SHAPES: tiny, tiny-qwen2, 0.5b, 1.5b, 8b; no downloads) is saved with a locally built tokenizer, then
each provider runs in its own process (so peak host RSS and GPU memory are its own):
- ours:          rlhf.ppo.loop.build_roles-style RoleModel (one base, 4-bit NF4 or unquantized, four
                 LoRA roles: policy, reference, reward + head, value + head) and `ppo_iteration`
                 (rollout, scoring, rewards/GAE, PPO epochs, ptx) at ptx_coef --ptx-coef (PPO-ptx);
- ours no-ptx:   the same at ptx_coef 0, the configuration TRL can express (with --peer trl);
- trl:           trl==1.12.0 `trl.experimental.ppo.PPOTrainer`, policy LoRA via its peft_config
                 (reference = adapter disabled), reward and value models as separate
                 AutoModelForSequenceClassification copies of the base (4-bit when ours is) each with
                 a LoRA adapter of the same rank (value: trainable adapter + score head; reward: frozen),
                 run by benchmarks/trl_peer.py in benchmarks/.venv-trl (benchmarks/setup_trl_venv.sh);
- trl no-gc:     the same with the two per-iteration `gc.collect()` calls of TRL's train loop made
                 no-ops (its module's `gc` replaced by a stub; nothing else changes).
Both sides generate exactly --answer-len tokens per answer (min_new_tokens = max_new_tokens), sample at
temperature 1 with no top-k/top-p, one mini-batch of the whole rollout batch per PPO epoch, and fp32 on
CPU / bf16 on CUDA. Timing: --warmup iterations, then --iterations timed ones; median with p20/p80 of
the iteration time and of each phase (rollout = generation, score = the four roles' no-grad forwards +
rewards + GAE, update = the PPO epochs incl. ptx). Tokens/s = answer tokens of the rollout batch / time.
Memory: CUDA max_memory_allocated / max_memory_reserved since after loading (reset_peak_memory_stats),
and the worker process's peak resident set (ru_maxrss, loading included).

With `--model DIR` a local model replaces the random shape: its own tokenizer and chat template over
real prompts (the instruction task's, or `--prompts FILE`), cut to rows of exactly --prompt-len tokens
that end where a prompt ends (benchmarks/real_prompts.py), the same rows for both providers.

Usage:
  python -m benchmarks.ppo_step --smoke                              # tiny, CPU, seconds
  python -m benchmarks.ppo_step --model models/smollm2-135m-instruct --prompt-len 64 --peer trl --rounds 4
  python -m benchmarks.ppo_step --shape tiny --peer trl              # issue 8's CPU comparison
  python -m benchmarks.ppo_step --shape tiny --quantization none --peer trl
  python -m benchmarks.ppo_step --shape tiny --peer trl --rounds 4   # alternating rounds, paired ratios
  python -m benchmarks.ppo_step --shape tiny --providers ours --profile   # + per-step timers, op table
  python -m benchmarks.ppo_step --shape 0.5b --batch 64 --answer-len 128 --peer trl   # GPU
  python -m benchmarks.ppo_step --shape 8b --batch 16 --answer-len 1024 --lora-r 16   # GPU
  python -m benchmarks.ppo_step --smoke --num_processes 2            # data parallel, 2 CPU processes (gloo)
  python -m benchmarks.ppo_step --shape 0.5b --batch 64 --answer-len 128 --num_processes 2   # 2 GPUs (NCCL)
With --num_processes N, ours runs under `accelerate launch --multi_gpu --num_processes N` (rlhf/distributed.py):
--batch stays the global rollout batch (B / N prompts sampled per process), and the table adds the total
and per-process tokens/s (on a CPU the processes share the cores: the figure is informational).
Writes JSON (default benchmarks/results/ppo_step-<shape>-<quant>-<device>[-smoke].json) with the device,
torch/triton/transformers/peft/bitsandbytes/trl versions, the commit and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.real_prompts import model_summary, write_prompt_rows
from benchmarks._common import (ROOT, SHAPES, build_model_dir, environment, package_version, peak_rss_mib,
                     percentile_summary, prompt_texts, shape_from_json, shape_to_json, write_json)

TRL_PYTHON = ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"
PHASES = ("rollout_s", "score_s", "update_s")
PTX_COEF = 27.8  # InstructGPT appendix C: PPO-ptx gamma
LABELS = {"ours": "ours (PPO-ptx)", "ours-noptx": "ours (PPO, no ptx)", "trl": "trl 1.12 (as shipped)",
          "trl-nogc": "trl 1.12 (no gc.collect)"}


# ---------------------------------------------------------------------------------------------
# Worker: ours
# ---------------------------------------------------------------------------------------------


def run_ours(settings: dict) -> dict:
    """One provider run in this process: load, warm up, time. -> result dict (see main)."""
    from rlhf.models import ModelConfig, RoleModel
    from rlhf.ppo.batches import PretrainBatches, PromptBatches
    from rlhf.ppo.config import PPOConfig, PPOData, RolloutConfig
    from rlhf.ppo.loop import build_trainer, ppo_iteration
    from rlhf.training import MicroBatchHalver, NonFiniteGuard, set_seed

    from rlhf import distributed

    os.environ.setdefault("RLHF_KERNELS_BACKEND", "auto")
    distributed.init()  # several processes: each on its own device, sampling B / N prompts
    device = distributed.place(torch.device(settings["device"]))
    B, T, P = settings["batch"], settings["answer_len"], settings["prompt_len"]
    cfg = PPOConfig(
        model=ModelConfig(path=settings["model_dir"], quantization=settings["quantization"],
                          lora_r=settings["lora_r"], lora_alpha=2.0 * settings["lora_r"],
                          gradient_checkpointing=settings["gradient_checkpointing"]),
        data=PPOData(max_prompt_length=P, max_pretrain_length=settings["ptx_len"]),
        rollout=RolloutConfig(batch_size=B, max_new_tokens=T, temperature=1.0, top_p=1.0, no_eos_score=None),
        ppo_epochs=settings["ppo_epochs"], mini_batch_size=settings["mini_batch"],
        micro_batch_size=settings["micro_batch"], ptx_coef=settings["ptx_coef"], ptx_batch_size=settings["ptx_batch"],
        iterations=settings["warmup"] + settings["iterations"], seed=0, device=str(device))
    cfg.validate()
    set_seed(0)
    t_load = time.perf_counter()
    model = RoleModel(cfg.model, device=device)
    # the four roles of build_roles, fresh adapters (B = 0: policy = reference at the start, as after SFT)
    model.add_role("reference", trainable=False)
    model.add_role("reward", trainable=False, head="reward")
    model.add_role("policy", trainable=True)
    model.add_role("value", trainable=True, head="value")
    load_s = time.perf_counter() - t_load
    sample = model.sample

    def fixed_length_sample(role, input_ids, attention_mask, max_new_tokens, *args):  # every answer exactly T tokens
        return sample(role, input_ids, attention_mask, max_new_tokens, *args, min_new_tokens=max_new_tokens)

    model.sample = fixed_length_sample
    n_prompts = B * cfg.iterations
    if settings.get("prompt_ids"):  # --model: real prompts, already tokenised to exactly P ids each
        prompts = FixedPrompts(json.loads(Path(settings["prompt_ids"]).read_text()), B, device)
        texts = settings["ptx_texts"]
    else:
        vocab = shape_from_json(settings["shape"]).vocab
        prompts = PromptBatches([{"prompt": text, "source": f"bench:{i}", "user_id": None}
                                 for i, text in enumerate(prompt_texts(n_prompts, P, vocab, seed=0))],
                                model.tokenizer, B, P, seed=0, device=device)
        texts = prompt_texts(cfg.ptx_batch_size * 4, settings["ptx_len"] - 1, vocab, seed=1)  # + EOS
    ptx = None
    if cfg.ptx_coef > 0:
        ptx = PretrainBatches([{"text": t, "source": f"bench-ptx:{i}", "user_id": None} for i, t in enumerate(texts)],
                              model.tokenizer, cfg.ptx_batch_size, settings["ptx_len"], seed=0, device=device)
    # the stage runner's guards, as `rlhf ppo` builds them (rlhf/stage_run.py)
    trainer = build_trainer(cfg, model, ptx, NonFiniteGuard(cfg.max_nonfinite_in_a_row),
                            MicroBatchHalver(cfg.micro_batch_size, False, "PPO iteration", []))
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for iteration in range(cfg.iterations):
        t0 = time.perf_counter()
        result = ppo_iteration(cfg, model, trainer, prompts.batch(iteration), iteration)
        if on_gpu:
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        answer_tokens = int(result.rollout.answer_mask.sum())
        if answer_tokens != B * T:
            raise RuntimeError(f"expected {B * T} answer tokens, got {answer_tokens}: fixed-length generation failed")
        rows.append({"total_s": total, **result.timings_s, "other_s": total - sum(result.timings_s.values())})
    out = finish(rows[settings["warmup"]:], settings, load_s, on_gpu, device)
    out["num_processes"] = distributed.world_size()
    out["per_process_tokens_per_s"] = out["total_tokens_per_s"] / distributed.world_size()
    if settings.get("profile"):
        out["profile"] = profile_iteration(cfg, model, trainer, prompts.batch(0), cfg.iterations, device)
    return out


class FixedPrompts:
    """Prompt rows of one length (benchmarks/real_prompts.py), served in order: batch i is rows iB..iB+B-1."""

    def __init__(self, rows: list[list[int]], batch_size: int, device: torch.device):
        self.rows, self.batch_size, self.device = rows, batch_size, device

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (iteration * self.batch_size) % len(self.rows)
        ids = torch.tensor([self.rows[(start + i) % len(self.rows)] for i in range(self.batch_size)])  # [B, P]
        return ids.to(self.device), torch.ones_like(ids).to(self.device)


PROFILE_LABELS = {  # function in its module's namespace -> the label its time is reported under
    ("rlhf.ppo.loop", "sample"): "rollout: sample (KV cache)",
    ("rlhf.ppo.loop", "score"): "score: 4 roles' forwards (no grad)",
    ("rlhf.ppo.loop", "ppo_epochs"): "update: PPO epochs (all)",
    ("rlhf.ppo.update", "micro_batch_losses"): "update: one forward (policy, value, ptx rows) + losses",
    ("rlhf.ppo.update", "ptx_nll_sum"): "update: - of which ptx LM head + NLL",
    ("torch.Tensor", "backward"): "update: backward (PPO + ptx)",
    ("torch.nn.utils", "clip_grad_norm_"): "update: clip_grad_norm_",
}
OPTIMIZER_LABEL = "update: optimizer step"


def _patched(wrap, optimizer):
    """Context: every PROFILE_LABELS function and optimizer.step replaced by wrap(fn, label), restored after."""
    import contextlib
    import importlib

    def owner(name):
        module, _, cls = name.rpartition(".")
        if name == "torch.Tensor":
            return getattr(importlib.import_module(module), cls)
        return importlib.import_module(name)

    @contextlib.contextmanager
    def ctx():
        saved = []
        for (name, attr), label in PROFILE_LABELS.items():
            target = owner(name)
            fn = getattr(target, attr)
            saved.append((target, attr, fn))
            setattr(target, attr, wrap(fn, label))
        step = optimizer.step  # an instance attribute (the LR scheduler's wrapper), so patched there
        optimizer.step = wrap(step, OPTIMIZER_LABEL)
        try:
            yield
        finally:
            for target, attr, fn in saved:
                setattr(target, attr, fn)
            optimizer.step = step

    return ctx()


def profile_iteration(cfg, model, trainer, prompt_batch, iteration, device) -> dict:
    """Two more iterations: one with wall-clock timers around each labelled step (low overhead: the
    breakdown), one under torch.profiler (the ops that take the time; its overhead inflates small ops).
    -> {"timers_ms": {label: ms}, "iteration_ms", "top_ops": [...]}"""
    from torch.profiler import ProfilerActivity, profile, record_function

    from rlhf.ppo.loop import ppo_iteration

    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    timers: dict[str, float] = {}

    def timed(fn, label):  # reads `timers` when called: each repeat below rebinds it
        def run(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                timers[label] = timers.get(label, 0.0) + (time.perf_counter() - t0) * 1e3

        return run

    runs = []  # three timed iterations; the one with the median time is reported (the machine may be shared)
    for repeat in range(3):
        timers = {}
        with _patched(timed, trainer.optimizer):
            t0 = time.perf_counter()
            ppo_iteration(cfg, model, trainer, prompt_batch, iteration + repeat)
            sync()
            runs.append(((time.perf_counter() - t0) * 1e3, timers))
    iteration_ms, timers = sorted(runs, key=lambda run: run[0])[1]
    iteration += 3

    def labelled(fn, label):
        def run(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)

        return run

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with _patched(labelled, trainer.optimizer), profile(activities=activities) as prof:
        ppo_iteration(cfg, model, trainer, prompt_batch, iteration + 1)
        sync()
    events = prof.key_averages()
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    top = [e for e in sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)
           if e.key not in {*PROFILE_LABELS.values(), OPTIMIZER_LABEL}][:20]
    top_ops = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                **({"self_device_ms": e.self_device_time_total / 1e3} if on_gpu else {})} for e in top]
    profiled_total = sum(e.self_cpu_time_total for e in events) / 1e3
    return {"iteration_ms": iteration_ms, "timers_ms": timers, "top_ops": top_ops,
            "profiled_self_cpu_total_ms": profiled_total}


def finish(timed: list[dict], settings: dict, load_s: float, on_gpu: bool, device: torch.device) -> dict:
    tokens = settings["batch"] * settings["answer_len"]
    out = {"load_s": load_s, "answer_tokens_per_iteration": tokens, "peak_rss_mib": peak_rss_mib()}
    for key in ("total_s", *PHASES, "other_s"):
        values = [row[key] for row in timed if key in row]
        if values:
            out[key] = percentile_summary(values)
            out[key.replace("_s", "_tokens_per_s")] = tokens / out[key]["median"]
    if on_gpu:
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


# ---------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------


def worker_command(provider: str, settings_path: Path, out_path: Path) -> list[str]:
    if provider.startswith("trl"):
        if not TRL_PYTHON.exists():
            raise SystemExit(f"--peer trl needs {TRL_PYTHON}: run `bash benchmarks/setup_trl_venv.sh` first")
        extra = ["--no-gc"] if provider == "trl-nogc" else []
        return [str(TRL_PYTHON), "-m", "benchmarks.trl_peer", "--settings", str(settings_path), "--out",
                str(out_path), *extra]
    launcher = []
    if settings_processes(settings_path) > 1:  # data parallel: accelerate starts N workers (gloo on CPU)
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(settings_processes(settings_path)), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return [sys.executable, *launcher, "-m", "benchmarks.ppo_step", "--worker", str(settings_path), "--worker-out",
            str(out_path)]


def settings_processes(settings_path: Path) -> int:
    return json.loads(settings_path.read_text()).get("num_processes", 1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_provider(provider: str, settings: dict, workdir: Path, timeout: float | None = None) -> dict:
    """Run one provider in a fresh process; -> its result dict, or {"error": ...}."""
    settings = dict(settings, ptx_coef=0.0 if provider != "ours" else settings["ptx_coef"])
    settings_path = workdir / f"settings-{provider}.json"
    settings_path.write_text(json.dumps(settings))
    out_path = workdir / f"result-{provider}.json"
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    try:
        # cwd = the repository root: the workers run as `python -m benchmarks.<name>`
        proc = subprocess.run(worker_command(provider, settings_path, out_path), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        oom = any("out of memory" in line.lower() or "OutOfMemoryError" in line for line in tail)
        return {"error": "OOM" if oom else f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(out_path.read_text())


def merge_rounds(rounds: list[dict]) -> dict:
    """One provider's results from several rounds -> one result: every timed iteration pooled (median
    and p20-p80 over all of them), peaks the largest, the first round's profile."""
    ok = [r for r in rounds if "error" not in r]
    if len(ok) < len(rounds):
        return next(r for r in rounds if "error" in r)
    merged = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, dict) and "all" in value:
            merged[key] = percentile_summary([v for r in ok for v in r[key]["all"]])
            merged[key.replace("_s", "_tokens_per_s")] = ok[0]["answer_tokens_per_iteration"] / merged[key]["median"]
        elif key.endswith("_mib"):
            merged[key] = max(r[key] for r in ok)
    return merged


def paired_ratios(rounds: dict[str, list[dict]], provider: str, base: str, key: str = "total_s") -> list[float]:
    """Per round: base's median time / provider's, both measured in that round (a drifting machine
    moves both alike)."""
    return [b[key]["median"] / p[key]["median"] for p, b in zip(rounds[provider], rounds[base])
            if "error" not in p and "error" not in b]


def add_ratios(results: dict[str, dict]) -> None:
    """x faster / x less memory than each TRL row, for every row."""
    for base in ("trl", "trl-nogc"):
        ref = results.get(base)
        if not ref or "total_s" not in ref:
            continue
        for r in results.values():
            if "total_s" not in r:
                continue
            r[f"x_faster_than_{base}"] = ref["total_s"]["median"] / r["total_s"]["median"]
            r[f"x_faster_update_than_{base}"] = ref["update_s"]["median"] / r["update_s"]["median"]
            mem_key = "max_memory_allocated_mib" if "max_memory_allocated_mib" in r else "peak_rss_mib"
            if ref.get(mem_key) and r.get(mem_key):
                r[f"x_less_memory_than_{base}"] = ref[mem_key] / r[mem_key]


def print_table(results: dict[str, dict], on_gpu: bool) -> None:
    mem = "GPU alloc/resv MiB" if on_gpu else "peak RSS MiB"
    header = (f"{'provider':<26}{'iter s (p20-p80)':>24}{'tok/s':>9}{'rollout s':>11}{'score s':>9}{'update s':>10}"
              f"{'other s':>9}{mem:>20}{'x trl':>8}{'x trl-nogc':>11}{'upd x trl':>10}{'upd x nogc':>11}")
    print(header)
    print("-" * len(header))
    for provider, r in results.items():
        label = LABELS.get(provider, provider)
        if "error" in r:
            print(f"{label:<26}{r['error'][:160]}")
            continue
        t = r["total_s"]
        spread = f"{t['median']:.3f} ({t['p20']:.3f}-{t['p80']:.3f})"
        memory = (f"{r['max_memory_allocated_mib']:.0f}/{r['max_memory_reserved_mib']:.0f}" if on_gpu
                  else f"{r['peak_rss_mib']:.0f}")
        f = lambda key, spec=".2f": format(r[key], spec) if r.get(key) is not None else "-"  # noqa: E731
        phase = lambda key: f"{r[key]['median']:.3f}" if key in r else "-"  # noqa: E731
        print(f"{label:<26}{spread:>24}{r['total_tokens_per_s']:>9.1f}{phase('rollout_s'):>11}{phase('score_s'):>9}"
              f"{phase('update_s'):>10}{phase('other_s'):>9}{memory:>20}{f('x_faster_than_trl'):>8}"
              f"{f('x_faster_than_trl-nogc'):>11}{f('x_faster_update_than_trl'):>10}"
              f"{f('x_faster_update_than_trl-nogc'):>11}")


def print_profile(label: str, prof: dict) -> None:
    total = prof["iteration_ms"]
    print(f"profile of one iteration, {label}: {total:.1f} ms (wall-clock timers around each step, inclusive)")
    for name, ms in sorted(prof["timers_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<50}{ms:>9.1f} ms {100 * ms / total:5.1f}%")
    print(f"  top ops by self CPU time under torch.profiler (share of {prof['profiled_self_cpu_total_ms']:.0f} ms):")
    for op in prof["top_ops"][:12]:
        device_ms = f"  device {op['self_device_ms']:.1f} ms" if "self_device_ms" in op else ""
        share = 100 * op["self_cpu_ms"] / prof["profiled_self_cpu_total_ms"]
        print(f"    {op['op'][:60]:<62}{op['self_cpu_ms']:>9.1f} ms {share:5.1f}% ({op['calls']} calls){device_ms}")


def settings_from(args, model_dir: Path, device: torch.device) -> dict:
    shape = None if args.model else shape_to_json(SHAPES[args.shape])
    return {"shape": shape, "shape_name": args.shape if shape else model_dir.name, "model_dir": str(model_dir),
            "device": str(device), "quantization": args.quantization, "lora_r": args.lora_r, "batch": args.batch,
            "mini_batch": args.mini_batch or args.batch,
            "micro_batch": args.micro_batch or args.mini_batch or args.batch,
            "answer_len": args.answer_len, "prompt_len": args.prompt_len, "ppo_epochs": args.ppo_epochs,
            "ptx_coef": args.ptx_coef, "ptx_batch": args.ptx_batch, "ptx_len": args.ptx_len,
            "warmup": args.warmup, "iterations": args.iterations,
            "gradient_checkpointing": args.gradient_checkpointing,
            # N processes on one CPU share its cores
            "threads": max(1, torch.get_num_threads() // args.num_processes),
            "profile": args.profile, "num_processes": args.num_processes}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 iterations, CPU seconds")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="rollout batch (prompts per iteration)")
    parser.add_argument("--mini-batch", type=int, help="PPO mini-batch (default: the rollout batch)")
    parser.add_argument("--micro-batch", type=int, help="rows per forward (default: the mini-batch)")
    parser.add_argument("--answer-len", type=int, default=32, help="answer tokens, fixed (EOS suppressed)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--ptx-coef", type=float, default=PTX_COEF, help="ours' PPO-ptx gamma (0: plain PPO)")
    parser.add_argument("--ptx-batch", type=int, default=8, help="pretraining rows per mini-batch")
    parser.add_argument("--ptx-len", type=int, default=64, help="pretraining row length in tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--profile", action="store_true", help="ours: one more iteration under torch.profiler")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every provider this many times, alternating the order; timings pooled, "
                             "ratios also per round")
    parser.add_argument("--peer", choices=["trl"], help="also run TRL 1.12 (as shipped and without gc.collect)")
    parser.add_argument("--providers", nargs="+", choices=sorted(LABELS), help="override the provider list")
    parser.add_argument("--model-dir", help="reuse (or create) the random model here instead of a temp dir")
    parser.add_argument("--model", help="a local Hugging Face model dir to benchmark instead of --shape: its own "
                                        "tokenizer (and chat template) over real prompts (benchmarks/real_prompts.py)")
    parser.add_argument("--prompts", help="with --model: a prompts file ({\"prompt\"} records); default: the "
                                          "instruction task's RL prompts")
    parser.add_argument("--out", help="JSON path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--num_processes", type=int, default=1,
                        help="ours: data parallel over N processes (accelerate launch; --batch stays global)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num_processes must be at least 1, got {args.num_processes}")
    if args.num_processes > 1 and (args.peer or any(p.startswith("trl") for p in args.providers or [])):
        parser.error("--num_processes runs ours only (TRL's peer here is single-process); drop --peer / trl providers")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.prompts and not args.model:
        parser.error("--prompts needs --model (the synthetic shapes use synthetic prompts)")
    if args.model and args.smoke:
        parser.error("--smoke runs the tiny synthetic shape; give --model with small --batch/--answer-len instead")
    if args.smoke:
        args.shape, args.batch, args.answer_len, args.prompt_len = "tiny", 4, 8, 8
        args.ppo_epochs, args.iterations, args.warmup, args.ptx_batch, args.ptx_len = 2, 2, 1, 2, 16
        args.mini_batch = args.micro_batch = None
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        settings = json.loads(Path(args.worker).read_text())
        torch.set_num_threads(settings["threads"])
        result = run_ours(settings)
        from rlhf import distributed

        if distributed.is_main():
            write_json(Path(args.worker_out), result)
        return
    device = torch.device(args.device)
    providers = args.providers or (["ours", "ours-noptx", "trl", "trl-nogc"] if args.peer else ["ours"])
    with tempfile.TemporaryDirectory(prefix="ppo_step-") as tmp:
        workdir = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
            settings = settings_from(args, model_dir, device)
            n_rows = args.batch * (args.warmup + args.iterations)
            settings.update(write_prompt_rows(model_dir, args.prompts, args.prompt_len, n_rows,
                                              workdir / "prompt_ids.json"))
        else:
            model_dir = Path(args.model_dir) if args.model_dir else workdir / "model"
            model_dir = build_model_dir(SHAPES[args.shape], model_dir)
            settings = settings_from(args, model_dir, device)
        rounds: dict[str, list[dict]] = {provider: [] for provider in providers}
        for round_index in range(args.rounds):
            # every other round runs the providers in reverse order, so a machine that speeds up or slows
            # down over the run does not favour whoever goes first
            order = providers if round_index % 2 == 0 else providers[::-1]
            for provider in order:
                print(f"round {round_index + 1}/{args.rounds}: running {LABELS[provider]} ...", flush=True)
                rounds[provider].append(run_provider(provider, settings, workdir))
    results = {provider: merge_rounds(rounds[provider]) for provider in providers}
    add_ratios(results)
    if args.rounds > 1:
        for base in ("trl", "trl-nogc"):
            if base not in providers:
                continue
            for provider in providers:
                if provider.startswith("ours"):
                    results[provider][f"rounds_x_faster_than_{base}"] = paired_ratios(rounds, provider, base)
                    results[provider][f"rounds_x_faster_update_than_{base}"] = paired_ratios(
                        rounds, provider, base, "update_s")
    env = environment(device, transformers=package_version("transformers"), peft=package_version("peft"),
                      bitsandbytes=package_version("bitsandbytes"))
    trl_versions = [r.get("trl") for r in results.values() if r.get("trl")]
    env["trl"] = trl_versions[0] if trl_versions else None
    print(f"device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | peft {env['peft']} "
          f"| bitsandbytes {env['bitsandbytes']} | trl {env['trl']} | commit {env['commit']}")
    s = settings
    if args.model:
        described = (f"model {args.model} ({model_summary(Path(args.model))}), prompts: {s['prompts_source']} "
                     f"(chat template: {s['chat_template']}, mean {s['mean_prompt_tokens']:.0f} tokens, "
                     f"cut to the last {s['prompt_len']})")
    else:
        described = f"shape {args.shape} ({SHAPES[args.shape]})"
    print(f"{described} | {s['quantization']} | LoRA r={s['lora_r']} "
          f"| batch {s['batch']} "
          f"(mini {s['mini_batch']}, micro {s['micro_batch']}) | prompt {s['prompt_len']} + answer {s['answer_len']} "
          f"tokens | {s['ppo_epochs']} PPO epochs | ptx_coef {s['ptx_coef']} x {s['ptx_batch']} rows of "
          f"{s['ptx_len']} (ours only) | {s['warmup']} warm-up + {s['iterations']} timed iterations"
          f"{f' x {args.rounds} rounds' if args.rounds > 1 else ''}")
    print_table(results, device.type == "cuda")
    for provider, r in results.items():
        if r.get("num_processes", 1) > 1:
            print(f"{LABELS[provider]} on {r['num_processes']} processes: {r['total_tokens_per_s']:.1f} tokens/s in "
                  f"total, {r['per_process_tokens_per_s']:.1f} per process")
    for provider, r in results.items():
        for base in ("trl", "trl-nogc"):
            per_round = r.get(f"rounds_x_faster_than_{base}")
            if per_round:
                update = r[f"rounds_x_faster_update_than_{base}"]
                print(f"{LABELS[provider]} vs {LABELS[base]}, per round (paired): iteration "
                      f"{' '.join(f'{x:.2f}' for x in per_round)}; update {' '.join(f'{x:.2f}' for x in update)}")
    for provider, r in results.items():
        if "profile" in r:
            print_profile(LABELS[provider], r["profile"])
    if any(p.startswith("trl") for p in providers):
        print("TRL cannot express: ptx (compare 'ours (PPO, no ptx)'), one shared base for the four roles (its "
              "reward and value models are separate copies of the base), value initialised from the RM.")
    default = (f"ppo_step-{settings['shape_name']}-{args.quantization}-{device.type}"
               f"{'-smoke' if args.smoke else ''}.json")
    out = Path(args.out or ROOT / "benchmarks" / "results" / default)
    model_record = ({"model": model_summary(Path(args.model))} if args.model
                    else {"shape": asdict(SHAPES[args.shape]), "params": SHAPES[args.shape].params()})
    write_json(out, {**env, "mode": "smoke" if args.smoke else "full",
                     "settings": {k: v for k, v in settings.items()
                                  if k not in ("model_dir", "ptx_texts", "prompt_ids")},
                     **model_record,
                     "labels": LABELS, "results": results})
    print(f"wrote {out}")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""What is the largest model whose PPO-ptx iteration fits on this device, at a given rollout batch and
answer length, for ours and (with --peer trl) for TRL 1.12's PPO trainer?

Walks a ladder of Llama-like shapes (hidden size and layers growing together, from 0.1B to 70B
parameters at the chosen vocabulary), and for each rung builds the random model (no downloads; the
same builder as benchmarks/ppo_step.py), runs one full PPO iteration per provider in a fresh process
(`ppo_step.run_provider`, warm-up 0, 1 iteration: rollout, scoring, PPO epochs, ptx for ours) and
records whether it fits: no CUDA out-of-memory error and, when --budget-mib is given, a peak no
larger than the budget (CUDA: max_memory_reserved; CPU: the worker's peak resident set). A
provider stops at its first rung that does not fit (memory grows with the rung); the answer is the
last rung that did.

Usage:
  python -m benchmarks.capacity --smoke                         # CPU, tiny rungs, seconds
  python -m benchmarks.capacity --smoke --budget-mib 1          # CPU: nothing fits (search logic)
  python -m benchmarks.capacity --batch 16 --answer-len 1024 --peer trl    # GPU: the real ladder
  python -m benchmarks.capacity --rungs 7b 8b 14b --batch 16 --answer-len 1024   # some rungs only
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import ppo_step
from benchmarks._common import ROOT, Shape, build_model_dir, environment, package_version, write_json

# name -> (hidden, intermediate, layers, heads, kv_heads): public configs of models of each size
# (Qwen2 0.5B/1.5B, Qwen2.5 3B/7B/14B/32B, Llama 3 8B/70B), at the vocabulary given by --vocab.
LADDER = {
    "0.5b": (896, 4864, 24, 14, 2),
    "1.5b": (1536, 8960, 28, 12, 2),
    "3b": (2048, 11008, 36, 16, 2),
    "7b": (3584, 18944, 28, 28, 4),
    "8b": (4096, 14336, 32, 32, 8),
    "14b": (5120, 13824, 48, 40, 8),
    "32b": (5120, 27648, 64, 40, 8),
    "70b": (8192, 28672, 80, 64, 8),
}
SMOKE_LADDER = {"h64-l1": (64, 128, 1, 4, 2), "h128-l2": (128, 256, 2, 4, 2)}


def search(rungs: dict[str, Shape], providers: list[str], try_rung) -> dict[str, dict]:
    """Ascend the ladder per provider until the first rung that does not fit.

    `try_rung(name, shape, provider) -> result dict` ({"fits": bool, ...}). -> provider -> {"largest": name
    or None, "rows": [...]}."""
    out = {p: {"largest": None, "rows": []} for p in providers}
    alive = list(providers)
    for name, shape in rungs.items():
        for provider in list(alive):
            row = try_rung(name, shape, provider)
            out[provider]["rows"].append({"rung": name, **row})
            if row["fits"]:
                out[provider]["largest"] = name
            else:
                alive.remove(provider)
        if not alive:
            break
    return out


def billions(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def peak_of(result: dict) -> float | None:
    return result.get("max_memory_reserved_mib", result.get("peak_rss_mib"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, two tiny rungs, short answers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rungs", nargs="+", help=f"subset of the ladder ({', '.join(LADDER)})")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary of every rung (Llama 3's)")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="rollout batch")
    parser.add_argument("--micro-batch", type=int, help="rows per forward (default: the rollout batch)")
    parser.add_argument("--answer-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--ppo-epochs", type=int, default=1, help="1 is enough: memory does not grow per epoch")
    parser.add_argument("--ptx-coef", type=float, default=ppo_step.PTX_COEF)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--budget-mib", type=float, help="fit only if the peak is at most this (CPU: peak RSS)")
    parser.add_argument("--peer", choices=["trl"], help="also search for TRL 1.12's largest")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per rung and provider")
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)

    if args.smoke:
        ladder, vocab = SMOKE_LADDER, 512
        args.batch, args.answer_len, args.prompt_len, args.ppo_epochs = 2, 4, 4, 1
    else:
        ladder, vocab = LADDER, args.vocab
    if args.rungs:
        unknown = set(args.rungs) - set(ladder)
        if unknown:
            parser.error(f"unknown rungs {sorted(unknown)}; choose from {list(ladder)}")
        ladder = {name: ladder[name] for name in args.rungs}
    rungs = {name: Shape("llama", vocab, h, i, layers, heads, kv, False) for name, (h, i, layers, heads, kv)
             in ladder.items()}
    device = torch.device(args.device)
    providers = ["ours"] + (["trl-nogc"] if args.peer else [])  # gc.collect does not change the peak

    step_args = ppo_step.parse_args([
        "--quantization", args.quantization, "--lora-r", str(args.lora_r), "--batch", str(args.batch),
        "--answer-len", str(args.answer_len), "--prompt-len", str(args.prompt_len), "--ppo-epochs",
        str(args.ppo_epochs), "--ptx-coef", str(args.ptx_coef), "--ptx-batch", "2" if args.smoke else "8",
        "--ptx-len", "16" if args.smoke else "512", "--iterations", "1", "--warmup", "0",
        *(["--micro-batch", str(args.micro_batch)] if args.micro_batch else []),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])])

    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        workdir = Path(tmp)

        def try_rung(name, shape, provider):
            model_dir = workdir / f"model-{name}"
            build_model_dir(shape, model_dir)
            ppo_step.SHAPES[name] = shape
            step_args.shape = name
            settings = ppo_step.settings_from(step_args, model_dir, device)
            result = ppo_step.run_provider(provider, settings, workdir, timeout=args.timeout)
            peak = peak_of(result)
            fits = "error" not in result and (args.budget_mib is None or (peak is not None and peak <= args.budget_mib))
            row = {"params": shape.params(), "fits": fits, "peak_mib": peak, "error": result.get("error"),
                   "iteration_s": result.get("total_s", {}).get("median")}
            if device.type == "cuda":
                row["max_memory_allocated_mib"] = result.get("max_memory_allocated_mib")
            print(f"  {provider:<9}{name:<9}{billions(shape.params()):>8}  "
                  f"{'fits' if fits else 'does not fit':<13} peak {peak if peak is None else round(peak)} MiB"
                  f"{'  ' + result['error'][:100] if 'error' in result else ''}", flush=True)
            return row

        found = search(rungs, providers, try_rung)
        for name in rungs:  # the model dirs are big at real sizes; the temp dir goes anyway
            shutil.rmtree(workdir / f"model-{name}", ignore_errors=True)

    env = environment(device, transformers=package_version("transformers"), peft=package_version("peft"),
                      bitsandbytes=package_version("bitsandbytes"))
    budget = f"{args.budget_mib:.0f} MiB budget" if args.budget_mib else "the device's memory"
    print(f"device: {env['device']} | {args.quantization} | LoRA r={args.lora_r} | batch {args.batch} | prompt "
          f"{args.prompt_len} + answer {args.answer_len} tokens | {args.ppo_epochs} PPO epoch(s) | ptx_coef "
          f"{args.ptx_coef} (ours) | vocab {vocab} | fits within {budget}")
    print(f"{'provider':<10}{'largest':<10}{'params':>9}")
    for provider, entry in found.items():
        largest = entry["largest"]
        params = billions(rungs[largest].params()) if largest else "-"
        print(f"{provider:<10}{largest or 'none':<10}{params:>9}")
    default = f"capacity-{device.type}{'-smoke' if args.smoke else ''}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / default)
    write_json(out, {**env, "mode": "smoke" if args.smoke else "full", "settings": vars(args),
                     "rungs": {name: asdict(shape) for name, shape in rungs.items()}, "results": found})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

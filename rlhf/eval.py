"""Evaluate policies and the cheap baselines that could explain them, on the `test` users' prompts.

Rows (each from answers sampled with a fixed seed, the same prompts for every row):
- sft: the SFT policy at `temperature`; max(best_of_n) answers per prompt are drawn once;
- best_of_n: per prompt, the answer the RM scores highest among the first n SFT answers (n in
  `best_of_n`); its KL is the exact best-of-n KL under the drawn answers' empirical distribution,
  with the analytic bound log n - (n - 1) / n beside it (`rlhf.eval_stats`);
- sft_t<T>: the SFT policy sampled at a lower temperature T (no RM at all);
- every RL policy given (`policies`, `policy_dir`; a run dir or one of its checkpoints).
Columns: rm_score (the proxy), gold_score (a named gold judge, rlhf.judges: toy or
instructions, where there is one) with a 95%
bootstrap interval over prompts, win_rate_vs_sft (every answer against every SFT answer to the same
prompt, ties 1/2) and gold_gain (gold minus SFT's gold, per prompt) with intervals, kl_to_sft (k1:
sum_t log pi(y_t) - log pi_SFT(y_t) on its own samples, nats), answer_length, cut_short (no EOS), the
gold judge's parts (fully_correct, correctness, extra_tokens) and, for the policies, pretrain_loss
(the "alignment tax" ptx protects). `rm_diagnostics` compares the RM with a length rule and the SFT
log-prob on pairs of SFT answers (`rlhf.rm_diagnostics`). `gold_vs_kl.png` plots every row.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import distributed
from rlhf.config import save_config, validate
from rlhf.data import load_parts, pad_left, pad_right, shift_labels, tokenize_pretrain, tokenize_prompts
from rlhf.errors import ConfigError
from rlhf.eval_config import EvalConfig, EvalData  # noqa: F401  (re-exported: `from rlhf.eval import EvalConfig`)
from rlhf.judges import gold_judge
from rlhf.eval_plot import plot_gold_vs_kl
from rlhf.eval_stats import (best_of_n_kl_bound, best_of_n_kl_estimate, best_of_n_pick, bootstrap_ci,
                             win_rate_per_prompt)
from rlhf.models import RoleModel
from rlhf.ppo.rollout import answer_logprobs, sample
from rlhf.progress import progress
from rlhf.rm_diagnostics import JudgedAnswer, format_diagnostics, pair_diagnostics
from rlhf.stage_dirs import adapter_dir
from rlhf.training import resolve_device, set_seed

log = logging.getLogger("rlhf.eval")


def _gold_judge(kind: str):
    """The named gold judge's `gold_score` (rlhf.judges), or None for "none"."""
    return None if kind == "none" else gold_judge(kind).gold_score


DETAIL_KEYS = ("fully_correct", "correctness", "extra_tokens", "form")  # the parts gold judges report


def _gold_details(kind: str):
    """(prompt, answer) -> {"fully_correct", "correctness", "extra_tokens" or "form"}: what a gold score is made of."""
    if kind == "toy":
        from rlhf.toy import judge

        def details(prompt: str, answer: str) -> dict[str, float]:
            j = judge(prompt, answer)
            return {"fully_correct": float(j.correctness == 1.0), "correctness": j.correctness,
                    "extra_tokens": float(j.extra_tokens)}
        return details
    if kind == "instructions":  # content plays correctness's part; form is the instruction's format
        from rlhf.tasks.instruction_judge import judge as instruction_judge

        def instruction_details(prompt: str, answer: str) -> dict[str, float]:
            j = instruction_judge(prompt, answer)
            return {"fully_correct": float(j.content == 1.0), "correctness": j.content, "form": j.form}
        return instruction_details
    return None


@dataclass
class Samples:
    """k answers to each of P prompts from one policy; every list is [P][k]."""
    answers: list[list[str]]
    rm: list[list[float]]
    kl: list[list[float]]  # sum_t log pi(y_t) - log pi_SFT(y_t) on the answer (k1, nats)
    sft_logprob: list[list[float]]  # sum_t log pi_SFT(y_t): the SFT model's sequence log-prob
    length: list[list[int]]  # answer tokens, EOS included
    cut_short: list[list[float]]  # 1.0 when the answer hit max_new_tokens without EOS

    def pick(self, index: list[int]) -> "Samples":
        """One answer per prompt: answer index[p] of prompt p."""
        return Samples(*[[[row[i]] for row, i in zip(column, index)] for column in (
            self.answers, self.rm, self.kl, self.sft_logprob, self.length, self.cut_short)])


def _per_prompt(flat: list, n_prompts: int, k: int) -> list[list]:
    """Flat sample-major values (sample i of prompt p at i * P + p) -> [P][k]."""
    return [[flat[i * n_prompts + p] for i in range(k)] for p in range(n_prompts)]


@torch.no_grad()
def draw_samples(model: RoleModel, role: str, prompts: list[dict], k: int, temperature: float,
                 cfg: EvalConfig) -> Samples:
    """Sample k answers per prompt from `role` at `temperature`; score each with the RM and the SFT model.

    The KL is to the SFT policy at `cfg.temperature`: a colder SFT baseline is a different policy
    (log-probs of `role` at its own sampling temperature, of the reference at the evaluation one).
    """
    tokenizer = model.tokenizer
    flat_prompts = prompts * k  # sample i of every policy shares its prompt and seed stream
    flat_prompts = distributed.eval_share(flat_prompts)  # several processes: a contiguous share each
    texts, rm_scores, kls, sft_lps, lengths, cut = [], [], [], [], [], []
    torch.manual_seed(distributed.rank_seed(cfg.seed))  # the same noise for every policy
    shown = "sft" if role == "reference" else role  # the SFT adapter is loaded as the reference role
    for start in progress(range(0, len(flat_prompts), cfg.batch_size), desc=f"eval {shown} samples", unit="batch"):
        rows = flat_prompts[start:start + cfg.batch_size]
        padded = pad_left([p["input_ids"] for p in rows], tokenizer.pad_token_id)
        rollout = sample(model, padded["input_ids"].to(model.device), padded["attention_mask"].to(model.device),
                         cfg.max_new_tokens, temperature, 1.0, role=role)
        policy_logp = answer_logprobs(model, role, rollout, temperature)  # [b, T] at its sampling temperature
        sft_logp = answer_logprobs(model, "reference", rollout, cfg.temperature)  # [b, T]
        mask = rollout.answer_mask
        kls += ((policy_logp - sft_logp) * mask).sum(dim=1).tolist()
        sft_lps += (sft_logp * mask).sum(dim=1).tolist()
        rm_scores += model.reward_scores("reward", rollout.sequences, rollout.attention_mask).float().tolist()
        lengths += mask.sum(dim=1).tolist()
        cut += (~rollout.ended_with_eos).float().tolist()
        texts += [tokenizer.decode(a[m], skip_special_tokens=True).strip() for a, m in zip(rollout.answers, mask)]
    columns = (texts, rm_scores, kls, sft_lps, lengths, cut)
    if distributed.active():  # every process's samples, in order: the means and win rates are over all of them
        parts = distributed.gather_objects(columns)
        columns = tuple([value for part in parts for value in part[i]] for i in range(len(columns)))
    n = len(prompts)
    return Samples(*[_per_prompt(column, n, k) for column in columns])


def _mean(rows: list[list[float]]) -> float:
    return sum(sum(row) for row in rows) / sum(len(row) for row in rows)


def summarise(samples: Samples, prompts: list[dict], judge, details, sft_gold: list[list[float]] | None,
              sft_details: dict[str, list[list[float]]] | None, cfg: EvalConfig) -> tuple[dict, dict]:
    """One table row from a policy's samples, and its per-answer gold values ({name: [P][k]}).

    With a gold judge: the gold score with a bootstrap interval over prompts, and (against SFT's
    answers to the same prompts) the win rate and the gold gain, each with its interval.
    """
    ci = dict(resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    row = {"rm_score": _mean(samples.rm), "kl_to_sft": _mean(samples.kl), "answer_length": _mean(samples.length),
           "cut_short": _mean(samples.cut_short)}
    values: dict[str, list[list[float]]] = {}
    if judge is None:
        return row, values
    values["gold"] = [[judge(p["prompt"], a) for a in answers] for p, answers in zip(prompts, samples.answers)]
    if details is not None:
        judged = [[details(p["prompt"], a) for a in answers] for p, answers in zip(prompts, samples.answers)]
        for key in DETAIL_KEYS:
            if key in judged[0][0]:  # each judge reports the parts it has
                values[key] = [[d[key] for d in answers] for answers in judged]
    per_prompt_gold = [sum(g) / len(g) for g in values["gold"]]
    row["gold_score"], *row["gold_ci"] = bootstrap_ci(per_prompt_gold, **ci)
    for key in DETAIL_KEYS:
        if key in values:
            row[key] = _mean(values[key])
    if sft_gold is not None:
        row["win_rate_vs_sft"], *row["win_rate_ci"] = bootstrap_ci(win_rate_per_prompt(values["gold"], sft_gold), **ci)
        gains = [sum(g) / len(g) - sum(s) / len(s) for g, s in zip(values["gold"], sft_gold)]
        row["gold_gain"], *row["gold_gain_ci"] = bootstrap_ci(gains, **ci)
        if sft_details is not None and "fully_correct" in values:
            gains = [sum(g) / len(g) - sum(s) / len(s)
                     for g, s in zip(values["fully_correct"], sft_details["fully_correct"])]
            row["fully_correct_gain"], *row["fully_correct_gain_ci"] = bootstrap_ci(gains, **ci)
    return row, values


def rm_diagnostics_on(samples: Samples, gold: list[list[float]]) -> dict:
    """RM vs length rule vs SFT log-prob on pairs of distinct SFT answers to each held-out prompt."""
    groups = []
    for p in range(len(samples.answers)):
        seen: dict[str, JudgedAnswer] = {}
        for i, answer in enumerate(samples.answers[p]):
            seen.setdefault(answer, JudgedAnswer(gold[p][i], samples.rm[p][i], int(samples.length[p][i]),
                                                 samples.sft_logprob[p][i]))
        groups.append(list(seen.values()))
    return pair_diagnostics(groups)


@torch.no_grad()
def pretrain_loss(model: RoleModel, role: str, chunks: list[dict], batch_size: int) -> float:
    nll, tokens = 0.0, 0
    pad_id = model.tokenizer.pad_token_id
    chunks = distributed.eval_share(chunks)  # several processes: each its share, the sums all-reduced
    shown = "sft" if role == "reference" else role
    for start in progress(range(0, len(chunks), batch_size), desc=f"eval {shown} pretrain loss", unit="batch"):
        padded = pad_right([c["input_ids"] for c in chunks[start:start + batch_size]], pad_id)
        labels = shift_labels(padded["input_ids"], padded["answer_mask"]).to(model.device)  # [b, S]
        logprobs = model.token_logprobs(role, padded["input_ids"].to(model.device),
                                        padded["attention_mask"].to(model.device), labels)  # [b, S]
        valid = labels != -100
        nll -= (logprobs * valid).sum().item()
        tokens += int(valid.sum())
    if distributed.active():
        nll, tokens = (sum(part) for part in zip(*distributed.gather_objects((nll, tokens))))
    return nll / max(tokens, 1)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def format_table(result: dict) -> str:
    """The comparison as text: one row per policy or baseline, intervals in brackets."""
    columns = [("gold_score", "gold_ci"), ("win_rate_vs_sft", "win_rate_ci"), ("kl_to_sft", None),
               ("fully_correct", None), ("rm_score", None), ("pretrain_loss", None), ("answer_length", None)]
    lines = [f"{'policy':<14}" + "".join(f"{key:>22}" for key, _ in columns)]
    for name, row in result["policies"].items():
        cells = []
        for key, ci in columns:
            text = _cell(row.get(key))
            if key == "kl_to_sft" and "kl_bound" in row:
                text += f" (<={row['kl_bound']:.2f})"
            if ci and row.get(ci):
                text += f" [{row[ci][0]:.2f},{row[ci][1]:.2f}]"
            cells.append(f"{text:>22}")
        lines.append(f"{name:<14}" + "".join(cells))
    k = result.get("answers_per_prompt", 1)
    lines.append(f"{result.get('part', 'held-out')} prompts: {result['n_prompts']} (users never seen in training); "
                 f"{result.get('sft_samples_per_prompt', k)} SFT samples per prompt (best-of-n takes prefixes), "
                 f"{k} per prompt for the other rows; 95% bootstrap intervals over prompts")
    rows = result["policies"].values()
    if not any(row.get("gold_score") is not None for row in rows):
        lines.append("gold_score, win_rate_vs_sft: - (they need a gold judge: --gold toy, the toy world's; "
                     "your own data has none)")
    if not any(row.get("pretrain_loss") is not None for row in rows):
        lines.append("pretrain_loss: - (needs pretraining text: --pretrain pretrain.jsonl)")
    return "\n".join(lines)


def evaluate(cfg: EvalConfig) -> dict:
    """Print the comparison table, write `<out_dir>/eval.json` and `gold_vs_kl.png`; returns the dict.
    Several processes: each samples its share of the held-out prompts; every mean, interval and win rate is
    over all of them (gathered), and rank 0 alone writes and prints."""
    distributed.init()
    validate(cfg)
    cfg.check_inputs()
    device = distributed.place(resolve_device(cfg.device))
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "eval_config.yaml")
    model = RoleModel(cfg.model, device=device)
    model.add_role("reference", adapter_dir=adapter_dir(cfg.sft_dir, "policy"))
    model.add_role("reward", adapter_dir=adapter_dir(cfg.rm_dir, "reward"), head="reward")

    (held_out,) = load_parts(cfg.data.path, "prompts", (cfg.data.part,), cfg.data.split, cfg.data.skip_invalid)
    prompts, _ = tokenize_prompts(held_out[:cfg.data.max_prompts], model.tokenizer, cfg.data.max_prompt_length,
                                  use_chat_template=cfg.data.use_chat_template)
    if not prompts:
        raise ConfigError(f"no {cfg.data.part} prompts to evaluate in {cfg.data.path} (the split leaves none)")
    chunks = []
    if cfg.data.pretrain:
        (held_texts,) = load_parts(cfg.data.pretrain, "pretrain", (cfg.data.part,), cfg.data.split,
                                   cfg.data.skip_invalid)
        chunks, _ = tokenize_pretrain(held_texts, model.tokenizer, cfg.data.max_pretrain_length)
        chunks = [c for c in chunks if len(c["input_ids"]) > 1][:cfg.data.max_pretrain_chunks]
    judge, details = _gold_judge(cfg.gold), _gold_details(cfg.gold)
    results: dict[str, dict] = {}
    sft_values: dict[str, list[list[float]]] = {}  # SFT's per-answer gold values: every row is compared with them

    def row_for(name: str, kind: str, samples: Samples, role: str | None) -> dict:
        row, values = summarise(samples, prompts, judge, details, sft_values.get("gold"),
                                sft_values or None, cfg)
        row = {"kind": kind, **row}
        if role is not None:
            row["pretrain_loss"] = pretrain_loss(model, role, chunks, cfg.batch_size) if chunks else None
        row["examples"] = [{"prompt": p["prompt"], "answer": a[0]} for p, a in zip(prompts[:5], samples.answers)]
        log.info("eval %s: %s", name, {k: v for k, v in row.items() if k != "examples"})
        results[name] = row
        return values

    # the SFT policy: max(best_of_n) samples per prompt, drawn once; every best-of-n takes a prefix
    k_sft = max([cfg.answers_per_prompt, *cfg.best_of_n])
    sft = draw_samples(model, "reference", prompts, k_sft, cfg.temperature, cfg)
    sft_values.update(row_for("sft", "sft", sft, "reference"))
    for n in cfg.best_of_n:
        picked = sft.pick([best_of_n_pick(rm, n) for rm in sft.rm])
        row_for(f"best_of_{n}", "best_of_n", picked, None)
        results[f"best_of_{n}"].update(
            n=n, kl_bound=best_of_n_kl_bound(n),
            kl_to_sft=sum(best_of_n_kl_estimate(a, r, n) for a, r in zip(sft.answers, sft.rm)) / len(prompts))
    for temperature in cfg.temperatures:
        colder = draw_samples(model, "reference", prompts, cfg.answers_per_prompt, temperature, cfg)
        row_for(f"sft_t{temperature:g}", "temperature", colder, None)
        results[f"sft_t{temperature:g}"]["temperature"] = temperature
    for name, run in cfg.all_policies().items():
        if name == "sft":
            continue
        model.add_role(name, adapter_dir=adapter_dir(run, "policy"))
        row_for(name, "policy", draw_samples(model, name, prompts, cfg.answers_per_prompt, cfg.temperature, cfg),
                name)
    result = {"policies": results, "part": cfg.data.part, "n_prompts": len(prompts),
              "sft_samples_per_prompt": k_sft, "answers_per_prompt": cfg.answers_per_prompt,
              "win_rate_vs_sft": {n: r["win_rate_vs_sft"] for n, r in results.items()
                                  if r["kind"] == "policy" and "win_rate_vs_sft" in r}}
    if judge is not None:
        result["rm_diagnostics"] = rm_diagnostics_on(sft, sft_values["gold"])
        log.info("eval RM diagnostics on SFT samples: %s", format_diagnostics(result["rm_diagnostics"]))
    def write() -> None:
        tmp = out / "eval.json.tmp"
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        tmp.replace(out / "eval.json")
        if judge is not None:
            plot_gold_vs_kl(result, out / "gold_vs_kl.png")
        print(format_table(result))
    distributed.on_main(write, "writing eval.json")
    return result

"""Is the reward model more than a length rule? Accuracies of the RM and of cheap rules on the same pairs.

For every pair of answers to one prompt that the labeller orders (tied pairs are dropped and counted),
the fraction ranked right by:
- the RM (its score);
- a length rule, "shorter is better" and "longer is better" (the better of the two is reported);
- the SFT model's sequence log-prob (an answer the SFT model finds likelier is better);
and the RM and log-prob accuracies again on the length-matched pairs alone (equal token length), where
a length rule is at chance and only the labeller's other criteria (correctness, on the toy world) can
separate the answers. A scorer that gives both answers the same value counts one half.

`rlhf rm` reports these on its validation rankings (label: the rank), `rlhf eval` on the SFT samples
it draws for the held-out prompts (label: the gold judge's score, where there is one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf.data import collate_rankings, shift_labels
from rlhf.eval_stats import win
from rlhf.models import RoleModel
from rlhf.stage_dirs import adapter_dir
from rlhf.training import autocast

log = logging.getLogger("rlhf.rm_diagnostics")


@dataclass(frozen=True)
class JudgedAnswer:
    """One answer as the diagnostics see it."""

    label: float  # the labeller's preference, higher is better (a gold score, or minus the rank)
    rm_score: float
    length: int  # answer tokens
    logprob: float | None = None  # the SFT model's sum of log p over the answer tokens; None: not computed


def _accuracy(pairs: list[tuple[JudgedAnswer, JudgedAnswer]], key) -> float | None:
    return sum(win(key(w), key(l)) for w, l in pairs) / len(pairs) if pairs else None


def pair_diagnostics(groups: Sequence[Sequence[JudgedAnswer]]) -> dict[str, float | int | str | None]:
    """Accuracies over all labelled pairs within each group (one group = the answers to one prompt)."""
    pairs, tied = [], 0
    for answers in groups:
        for i, a in enumerate(answers):
            for b in answers[i + 1:]:
                if a.label == b.label:
                    tied += 1
                else:
                    pairs.append((a, b) if a.label > b.label else (b, a))  # (winner, loser)
    matched = [(w, l) for w, l in pairs if w.length == l.length]
    shorter = _accuracy(pairs, lambda a: -a.length)
    longer = _accuracy(pairs, lambda a: a.length)
    has_logprob = bool(pairs) and all(w.logprob is not None and l.logprob is not None for w, l in pairs)
    logprob = (lambda a: a.logprob) if has_logprob else None
    return {
        "pairs": len(pairs),
        "tied_pairs_dropped": tied,
        "rm_accuracy": _accuracy(pairs, lambda a: a.rm_score),
        "shorter_is_better_accuracy": shorter,
        "longer_is_better_accuracy": longer,
        "length_rule_accuracy": None if shorter is None else max(shorter, longer),
        "length_rule": None if shorter is None else ("shorter" if shorter >= longer else "longer"),
        "sft_logprob_accuracy": _accuracy(pairs, logprob) if logprob else None,
        "length_matched_pairs": len(matched),
        "rm_accuracy_length_matched": _accuracy(matched, lambda a: a.rm_score),
        "sft_logprob_accuracy_length_matched": _accuracy(matched, logprob) if logprob else None,
    }


def format_diagnostics(d: dict) -> str:
    """One line for logs: the RM against the rules on the same pairs."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    return (f"RM accuracy {f(d['rm_accuracy'])} vs length rule ({d['length_rule']} is better) "
            f"{f(d['length_rule_accuracy'])} vs SFT log-prob {f(d['sft_logprob_accuracy'])} on {d['pairs']} pairs "
            f"({d['tied_pairs_dropped']} tied dropped); length-matched ({d['length_matched_pairs']} pairs): "
            f"RM {f(d['rm_accuracy_length_matched'])}, SFT log-prob {f(d['sft_logprob_accuracy_length_matched'])}")


@torch.no_grad()
def ranking_groups(model: RoleModel, examples: list[dict], reward_role: str, sft_role: str | None,
                   batch_size: int, device: torch.device, precision: str) -> list[list[JudgedAnswer]]:
    """Tokenised rankings (`tokenize_rankings`, best first) -> one group per ranking, label = -rank.

    Scores each answer with `reward_role` and, when `sft_role` is given, its sequence log-prob under it.
    """
    groups = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_rankings(examples[start:start + batch_size],
                                                              model.tokenizer.pad_token_id).items()}
        with autocast(device, precision):
            scores = model.reward_scores(reward_role, batch["input_ids"], batch["attention_mask"]).float()  # [M]
            logprobs = None
            if sft_role is not None:
                labels = shift_labels(batch["input_ids"], batch["answer_mask"])  # [M, S]
                token_lp = model.token_logprobs(sft_role, batch["input_ids"], batch["attention_mask"], labels)
                logprobs = (token_lp.float() * (labels != -100)).sum(dim=1)  # [M]
        lengths = batch["answer_mask"].sum(dim=1)  # [M] answer tokens, EOS included
        offset = len(groups)
        for row in range(len(scores)):
            index = int(batch["prompt_index"][row]) + offset
            if index == len(groups):
                groups.append([])
            groups[index].append(JudgedAnswer(label=-float(batch["rank"][row]), rm_score=float(scores[row]),
                                              length=int(lengths[row]),
                                              logprob=None if logprobs is None else float(logprobs[row])))
    return groups


def rm_stage_diagnostics(model: RoleModel, examples: list[dict], sft_dir: str, batch_size: int,
                         device: torch.device, precision: str) -> dict:
    """The RM stage's diagnostics on its validation rankings, keys prefixed "val_diag_"; the SFT
    log-prob column needs the SFT run (`sft_dir`), loaded as one more frozen role."""
    sft_role = None
    if sft_dir:
        sft_role = "diagnostics_sft"
        if sft_role not in model.roles:
            model.add_role(sft_role, adapter_dir=adapter_dir(sft_dir, "policy"))
    diagnostics = pair_diagnostics(ranking_groups(model, examples, "reward", sft_role, batch_size, device, precision))
    log.info("RM diagnostics on the validation rankings: %s", format_diagnostics(diagnostics))
    return {f"val_diag_{key}": value for key, value in diagnostics.items()}

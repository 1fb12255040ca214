"""RM diagnostics (rlhf.rm_diagnostics): the RM against a length rule and the SFT log-prob on the same pairs.

The constructed cases have accuracies worked out by hand in the comments.
"""

from __future__ import annotations

import pytest

from rlhf.rm_diagnostics import JudgedAnswer, format_diagnostics, pair_diagnostics


def test_length_detector_rm_is_at_chance_on_length_matched_pairs():
    # One prompt, four answers: label = gold (higher better), the "RM" is a pure length detector
    # (score = -length), the SFT log-prob prefers the correct answers.
    #   A label 1.0 len 3  rm -3  lp -1
    #   B label 0.8 len 4  rm -4  lp -2
    #   C label 0.5 len 3  rm -3  lp -3
    #   D label 0.0 len 2  rm -2  lp -4
    answers = [JudgedAnswer(1.0, -3.0, 3, -1.0), JudgedAnswer(0.8, -4.0, 4, -2.0),
               JudgedAnswer(0.5, -3.0, 3, -3.0), JudgedAnswer(0.0, -2.0, 2, -4.0)]
    d = pair_diagnostics([answers])
    # 6 pairs (winner first): AB AC AD BC BD CD
    # RM (shorter wins): AB 1, AC tie 1/2, AD 0, BC 0, BD 0, CD 0 -> 1.5 / 6 = 0.25
    assert d["pairs"] == 6 and d["tied_pairs_dropped"] == 0
    assert d["rm_accuracy"] == pytest.approx(0.25)
    # "shorter is better" is the same rule as this RM: 0.25; "longer is better": AB 0, AC 1/2, AD 1,
    # BC 1, BD 1, CD 1 -> 4.5 / 6 = 0.75, so the length rule reported is "longer" at 0.75
    assert d["shorter_is_better_accuracy"] == pytest.approx(0.25)
    assert d["longer_is_better_accuracy"] == pytest.approx(0.75)
    assert d["length_rule"] == "longer" and d["length_rule_accuracy"] == pytest.approx(0.75)
    # the log-prob orders all four exactly as the labels do: 6 / 6
    assert d["sft_logprob_accuracy"] == pytest.approx(1.0)
    # length-matched pairs: only AC (both 3 tokens); the length detector ties there (1/2),
    # the log-prob gets it right (1)
    assert d["length_matched_pairs"] == 1
    assert d["rm_accuracy_length_matched"] == pytest.approx(0.5)
    assert d["sft_logprob_accuracy_length_matched"] == pytest.approx(1.0)
    assert "RM accuracy 0.250 vs length rule (longer is better) 0.750" in format_diagnostics(d)


def test_tied_labels_are_dropped_and_counted_and_groups_stay_apart():
    # Group 1: X and Y tie on the label (dropped), Z is worse than both: 2 pairs, 1 tie.
    # Group 2: one answer, no pairs. Pairs never cross groups: X (group 1) vs W (group 2) is not one.
    # The RM scores Z highest, so it gets both pairs wrong: accuracy 0. No log-probs given -> None.
    group1 = [JudgedAnswer(1.0, 0.0, 2), JudgedAnswer(1.0, 0.1, 5), JudgedAnswer(0.0, 9.0, 2)]
    group2 = [JudgedAnswer(5.0, -9.0, 7)]
    d = pair_diagnostics([group1, group2])
    assert d["pairs"] == 2 and d["tied_pairs_dropped"] == 1
    assert d["rm_accuracy"] == 0.0
    assert d["sft_logprob_accuracy"] is None and d["sft_logprob_accuracy_length_matched"] is None
    # XZ is length-matched (2 and 2); YZ is not
    assert d["length_matched_pairs"] == 1 and d["rm_accuracy_length_matched"] == 0.0


def test_no_pairs_gives_no_accuracies():
    d = pair_diagnostics([[JudgedAnswer(1.0, 0.0, 2), JudgedAnswer(1.0, 1.0, 3)]])
    assert d["pairs"] == 0 and d["tied_pairs_dropped"] == 1
    assert d["rm_accuracy"] is None and d["length_rule"] is None


def test_ranking_groups_scores_each_answer_of_each_ranking_with_a_stub_length_detector_rm():
    """`ranking_groups` on tokenised rankings, with a stub model whose RM is a pure length detector
    (score = minus the sequence length) and whose SFT log-probs are all 0."""
    import types

    import torch

    from rlhf.rm_diagnostics import ranking_groups

    def reward_scores(role, input_ids, attention_mask):
        assert role == "reward"
        return -attention_mask.sum(dim=1).float()

    def token_logprobs(role, input_ids, attention_mask, labels):
        assert role == "sft"
        return torch.zeros(labels.shape)

    stub = types.SimpleNamespace(tokenizer=types.SimpleNamespace(pad_token_id=0), reward_scores=reward_scores,
                                 token_logprobs=token_logprobs)
    # ranking 1: the better answer has 3 answer tokens, the worse 1 -> the length detector gets it wrong (0)
    # ranking 2: both answers 1 token -> the length detector ties (1/2); a length-matched pair
    examples = [{"input_ids": [[1, 2, 7, 8, 9], [1, 2, 7]], "answer_start": [2, 2]},
                {"input_ids": [[1, 2, 5], [1, 2, 6]], "answer_start": [2, 2]}]
    groups = ranking_groups(stub, examples, "reward", "sft", batch_size=1, device=torch.device("cpu"),
                            precision="fp32")
    assert [[(a.label, a.rm_score, a.length, a.logprob) for a in g] for g in groups] == [
        [(0.0, -5.0, 3, 0.0), (-1.0, -3.0, 1, 0.0)], [(0.0, -3.0, 1, 0.0), (-1.0, -3.0, 1, 0.0)]]
    d = pair_diagnostics(groups)
    assert d["pairs"] == 2 and d["rm_accuracy"] == pytest.approx(0.25)  # (0 + 1/2) / 2
    assert d["length_rule"] == "longer" and d["length_rule_accuracy"] == pytest.approx(0.75)  # (1 + 1/2) / 2
    assert d["sft_logprob_accuracy"] == pytest.approx(0.5)  # all ties
    assert d["length_matched_pairs"] == 1 and d["rm_accuracy_length_matched"] == pytest.approx(0.5)

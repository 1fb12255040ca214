"""The instruction task: its gold judge on hand-graded answers, its data directory's layout and user
split, and the pipeline run on it end to end (a tiny random model with a byte-level tokenizer)."""

from __future__ import annotations

import json
import math

import pytest

from byte_level_model import build_byte_level_model
from rlhf.config import load_config
from rlhf.data import UserSplit, load_records
from rlhf.errors import ConfigError, DataError
from rlhf.judges import GOLD_JUDGES, gold_judge
from rlhf.pipeline_config import PipelineConfig
from rlhf.tasks.instruction_judge import gold_score, judge, parse_request, rank
from rlhf.tasks.instructions import (KINDS, InstructionTaskConfig, answer, make_records, make_users,
                                     write_instruction_task)

TOL = 1e-6  # scores are rounded to 6 decimals
ADD = "What is 17 + 25? Answer with the number only.\n"
SORT = "Sort these numbers from smallest to largest: 42, 7, 19. Reply with the numbers only, separated by commas.\n"
LIST = "List 3 fruits, separated by commas. Reply with the list only.\n"
LOWER = "Name 4 colors in lowercase letters only, separated by commas.\n"
CAPITAL = "What is the capital of Kenya? Answer with one word.\n"
UPPER = "Write the word 'river' in capital letters only.\n"
SMALL = dict(n_users=12, n_sft=48, n_rm_prompts=32, n_rl_prompts=64, n_pretrain_texts=64)


# --- the gold judge, worked by hand: score = content * (0.5 + 0.5 * form) -----------------------------
@pytest.mark.parametrize("prompt, reply, content, form", [
    (ADD, "42", 1, 1),
    (ADD, "42.", 1, 1),  # one final stop is allowed
    (ADD, "The answer is 42.", 1, 0),  # right, chatty
    (ADD, "17 + 25 = 42", 1, 0),  # the restatement is skipped: 42 is read
    (ADD, "41", 0.9, 1),  # off by one: 1 - 1/10
    (ADD, "32", 0, 1),  # off by ten: nothing, however well formed
    (ADD, "", 0, 0),
    (SORT, "7, 19, 42", 1, 1),
    (SORT, "7, 42, 19", 1 / 3, 1),  # one position of three right
    (SORT, "The sorted numbers are 7, 19, 42.", 1, 0),
    (SORT, "7 19 42", 1, 0),  # not comma-separated
    (LIST, "apple, banana, cherry", 1, 1),
    (LIST, "Apples, bananas and cherries.", 1, 1),  # plurals, 'and' and a final stop read as three items
    (LIST, "1. Apple\n2. Banana\n3. Dog", 2 / 3, 0.5),  # numbered lines: count fails, items are short
    (LIST, "apple, apple, apple", 1 / 3, 1),  # one distinct fruit
    (LIST, "Here are three fruits: apple, banana, cherry", 2 / 3, 0.5),  # prose in the first item
    (LOWER, "red, blue, green, pink", 1, 1),
    (LOWER, "Red, Blue, Green, Pink", 1, 0.5),  # right count, not lower case
    (LOWER, "red, blue, green", 3 / 4, 0.5),  # lower case, one item short
    (CAPITAL, "Nairobi", 1, 1),
    (CAPITAL, "nairobi.", 1, 1),
    (CAPITAL, "The capital of Kenya is Nairobi.", 1, 0),
    (CAPITAL, "Mombasa", 0, 1),
    (UPPER, "RIVER", 1, 1),
    (UPPER, "River", 1, 0),
    (UPPER, "LAKE", 0, 1),  # well formed, wrong word: 0
    (UPPER, "The word in capitals is RIVER", 1, 0),
])
def test_judge_grades_content_and_form_by_hand(prompt, reply, content, form):
    verdict = judge(prompt, reply)
    assert verdict.content == pytest.approx(content, abs=TOL)
    assert verdict.form == pytest.approx(form, abs=TOL)
    assert verdict.score == pytest.approx(content * (0.5 + 0.5 * form), abs=TOL)


def test_length_alone_cannot_win():
    # the shortest well-formed answers score nothing unless they are right
    assert gold_score(ADD, "0") == 0.0 and gold_score(CAPITAL, "x") == 0.0 and gold_score(LIST, "") == 0.0
    # a right answer in a long chatty form beats a short wrong one
    assert gold_score(CAPITAL, "The capital of Kenya is Nairobi.") > gold_score(CAPITAL, "Mombasa")


def test_judge_reads_prompts_with_a_users_opener_and_rejects_foreign_ones():
    assert judge("Quick question: " + ADD, "42").score == 1.0
    assert parse_request("Hi! " + SORT).numbers == (42, 7, 19)
    with pytest.raises(DataError, match="instructions gold judge cannot grade prompt 'sort : c a b ='"):
        judge("sort : c a b =", "a b c")


def test_rank_orders_by_score_and_keeps_ties_in_input_order():
    replies = ["Mombasa", "The capital of Kenya is Nairobi.", "Nairobi", "Lagos"]
    assert rank(CAPITAL, replies) == [2, 1, 0, 3]


def test_named_judges_registry():
    assert set(GOLD_JUDGES) == {"toy", "instructions"}
    assert gold_judge("instructions").gold_score(ADD, "42") == 1.0
    assert gold_judge("toy").gold_score("sort : c a b =", "a b c") == 1.0
    with pytest.raises(KeyError, match="no gold judge named 'gpt4'"):
        gold_judge("gpt4")


# --- the data writer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_instruction_task(tmp_path_factory.mktemp("task") / "data", InstructionTaskConfig(**SMALL))


def test_task_dir_layout_and_formats(task_dir):
    manifest = json.loads((task_dir / "task.json").read_text())
    assert manifest["gold"] == "instructions" and manifest["task"] == "instructions"
    assert manifest["counts"] == {"sft": 48, "rankings": 32, "prompts": 64, "pretrain": 64}
    for kind, count in manifest["counts"].items():
        records = load_records(task_dir / f"{kind}.jsonl", kind)  # every record in the documented format
        assert len(records) == count
        if kind != "pretrain":
            assert all(r["user_id"].startswith("user_") and r["prompt"].endswith("\n") for r in records)
    assert all(set(json.loads(line)) == {"text"} for line in (task_dir / "pretrain.jsonl").read_text().splitlines())


def test_demonstrations_are_right_and_some_are_sloppy(task_dir):
    demos = [json.loads(line) for line in (task_dir / "sft.jsonl").read_text().splitlines()]
    verdicts = [judge(d["prompt"], d["completion"]) for d in demos]
    assert all(v.content == 1.0 for v in verdicts)  # demonstrations are right
    sloppy = sum(v.form < 1.0 for v in verdicts)
    assert 0 < sloppy < len(demos) // 2  # demo_sloppy_rate 0.25: right but chatty, like human ones
    assert {v.kind for v in verdicts} == set(KINDS)


def test_rankings_are_strictly_ordered_by_the_judge(task_dir):
    for record in load_records(task_dir / "rankings.jsonl", "rankings"):
        scores = [gold_score(record["prompt"], r) for r in record["responses"]]
        assert len(scores) >= 2 and all(a > b for a, b in zip(scores, scores[1:])), scores  # no ties


def test_users_have_habits_and_the_split_keeps_them_apart(task_dir):
    prompts = load_records(task_dir / "prompts.jsonl", "prompts")
    split = UserSplit.load(task_dir / "split.json")  # the one split every stage reads
    parts = {part: {r["user_id"] for r in split.select(prompts, part)} for part in ("train", "tune", "test")}
    assert parts["test"] and parts["train"] and not parts["train"] & parts["test"]
    demos = load_records(task_dir / "sft.jsonl", "sft")
    assert not {r["user_id"] for r in split.select(demos, "train")} & parts["test"]
    users = {u.user_id: u for u in make_users(12, seed=0)}
    favourite = [parse_request(r["prompt"]).kind == users[r["user_id"]].favourite_kind for r in prompts]
    assert sum(favourite) / len(favourite) > 0.4  # 60% + 40%/6 expected; chance is 1/6


def test_writer_is_deterministic_and_refuses_other_settings(task_dir, tmp_path):
    again = write_instruction_task(tmp_path / "again", InstructionTaskConfig(**SMALL))
    for name in ("sft.jsonl", "rankings.jsonl", "prompts.jsonl", "pretrain.jsonl", "task.json"):
        assert (again / name).read_bytes() == (task_dir / name).read_bytes()
    assert write_instruction_task(again, InstructionTaskConfig(**SMALL)) == again  # complete: returned as is
    with pytest.raises(ConfigError, match="holds an instruction task written with other settings"):
        write_instruction_task(again, InstructionTaskConfig(**{**SMALL, "seed": 1}))
    write_instruction_task(again, InstructionTaskConfig(**{**SMALL, "seed": 1}), overwrite=True)
    assert (again / "sft.jsonl").read_bytes() != (task_dir / "sft.jsonl").read_bytes()


def test_program_answers_have_the_asked_qualities():
    import random
    rng = random.Random(0)
    records = make_records(InstructionTaskConfig(**SMALL))
    for record in records["prompts"][:30]:
        prompt = record["prompt"]
        assert judge(prompt, answer(prompt, rng)).score == 1.0
        assert judge(prompt, answer(prompt, rng, sloppy=True)).form < 1.0
        assert judge(prompt, answer(prompt, rng, wrong=True)).content < 1.0


# --- the pipeline's gold judge comes from the task directory ---------------------------------------------
def test_pipeline_takes_its_judge_from_the_task_dir(task_dir, tmp_path):
    cfg = load_config(PipelineConfig, overrides={"model_path": str(tmp_path), "data.dir": str(task_dir)})
    assert cfg.gold_judge() == "instructions" and cfg.rm_labels == "sampled"
    (tmp_path / "plain").mkdir()
    for name in ("sft", "prompts", "pretrain", "rankings"):
        (tmp_path / "plain" / f"{name}.jsonl").write_bytes((task_dir / f"{name}.jsonl").read_bytes())
    with pytest.raises(ConfigError, match="rm_labels='sampled' needs a gold judge to rank the samples"):
        load_config(PipelineConfig, overrides={"model_path": str(tmp_path), "data.dir": str(tmp_path / "plain")})
    cfg = load_config(PipelineConfig, overrides={"model_path": str(tmp_path), "data.dir": str(tmp_path / "plain"),
                                                 "gold": "instructions"})
    assert cfg.gold_judge() == "instructions"
    with pytest.raises(ConfigError, match="gold must be one of"):
        load_config(PipelineConfig, overrides={"gold": "gpt4"})


# --- the pipeline on the task, end to end, with a tiny random model ------------------------------------
TINY_PIPELINE = {
    "quantization": "none", "device": "cpu", "rm_k": 3,
    "sft.epochs": 1, "sft.batch_size": 16, "sft.micro_batch_size": 16, "sft.eval_every": 1000,
    "sft.data.max_length": 96, "rm.data.max_length": 96,
    "rm.batch_size": 8, "rm.micro_batch_size": 8, "rm.eval_every": 1000,
    "ppo.iterations": 1, "ppo.rollout.batch_size": 8, "ppo.mini_batch_size": 8, "ppo.micro_batch_size": 8,
    "ppo.ppo_epochs": 1, "ppo.rollout.max_new_tokens": 6, "ppo.ptx_batch_size": 4, "ppo.data.max_prompt_length": 64,
    "eval.data.max_prompts": 8, "eval.data.max_pretrain_chunks": 8, "eval.answers_per_prompt": 1,
    "eval.data.max_prompt_length": 64,
}


def test_pipeline_runs_the_task_end_to_end(task_dir, tmp_path):
    model_dir = build_byte_level_model(tmp_path / "model")
    out = tmp_path / "run"
    # a random model's samples all score 0 by the judge (ties, which labelling drops), so the RM trains on
    # the task's program-written rankings here; evaluation still scores with the task's judge
    cfg = load_config(PipelineConfig, overrides={"out_dir": str(out), "model_path": str(model_dir),
                                                 "data.dir": str(task_dir), "rm_labels": "file", **TINY_PIPELINE})
    from rlhf.pipeline import run

    result = run(cfg)
    assert list(result["policies"])[:1] == ["sft"] and {"ppo", "ppo_ptx"} <= set(result["policies"])
    for name, row in result["policies"].items():  # every row, baselines included, is scored by the judge
        assert 0.0 <= row["gold_score"] <= 1.0 and math.isfinite(row["kl_to_sft"]), (name, row)
        assert 0.0 <= row["correctness"] <= 1.0 and 0.0 <= row["form"] <= 1.0, (name, row)  # content, form
    for name in ("sft", "ppo", "ppo_ptx"):  # None when no held-out pretraining text falls in the test part
        loss = result["policies"][name]["pretrain_loss"]
        assert loss is None or math.isfinite(loss)
    assert 0.0 <= result["policies"]["ppo"]["win_rate_vs_sft"] <= 1.0
    assert (out / "eval_config.yaml").read_text().count("gold: instructions") == 1
    # every stage reads the task's own split (its fractions), not one the pipeline would draw again
    assert not (out / "split.json").exists()
    for stage_config in (out / "sft" / "config.yaml", out / "eval_config.yaml"):
        assert f"split: {task_dir / 'split.json'}" in stage_config.read_text(), stage_config


def test_pipeline_split_precedence_task_dir_then_a_run_s_own(task_dir, tmp_path):
    from rlhf.pipeline import _split_file

    cfg = load_config(PipelineConfig, overrides={"model_path": str(tmp_path), "data.dir": str(task_dir)})
    files = {"prompts": task_dir / "prompts.jsonl"}
    assert _split_file(cfg, tmp_path / "fresh", None, files) == task_dir / "split.json"
    began = tmp_path / "began"  # a run that wrote its own split before: reruns keep it
    began.mkdir()
    (began / "split.json").write_text((task_dir / "split.json").read_text())
    assert _split_file(cfg, began, None, files) == began / "split.json"
    given = load_config(PipelineConfig, overrides={"model_path": str(tmp_path), "data.dir": str(task_dir),
                                                   "split": str(began / "split.json")})
    assert _split_file(given, tmp_path / "fresh", None, files) == began / "split.json"


def test_example_config_runs_the_task_with_its_judge(task_dir, tmp_path):
    """examples/instructions.yaml (the README's command) loads over a task dir and labels with its judge."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "instructions.yaml"
    cfg = load_config(PipelineConfig, str(example), {"model_path": str(tmp_path), "data.dir": str(task_dir)})
    assert cfg.gold_judge() == "instructions" and cfg.rm_labels == "sampled" and cfg.quantization == "none"
    assert cfg.sft.epochs == 1 and cfg.ppo.iterations == 10 and cfg.data.prompts == str(task_dir / "prompts.jsonl")

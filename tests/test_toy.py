"""The toy world: deterministic files in the documented formats, a graded gold labeller, imperfect
demonstrations, a round-tripping tokenizer and a loadable pretrained base model."""

import json
import os
import statistics

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.errors import ConfigError, DataError
from rlhf.toy import ToyConfig, ToyWorld, build_tokenizer, gold_score, judge, rank, target_answer, write_toy_world
from rlhf.toy.world import make_records

SCORE_TOL = 1e-6  # gold scores are rounded to 6 decimals
# A quick world with even fewer steps, for the tests that write their own worlds.
TINY = dict(pretrain_steps=4, warmup_steps=1, n_pretrain_texts=200)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_files_other_seed_other_files(tmp_path, quick_toy_world):
    again = write_toy_world(tmp_path / "again", ToyConfig.quick())
    for name in ("sft", "rankings", "prompts", "pretrain"):
        assert getattr(again, name).read_bytes() == getattr(quick_toy_world, name).read_bytes(), name
    assert (again.model / "tokenizer.json").read_bytes() == (quick_toy_world.model / "tokenizer.json").read_bytes()
    weights, weights_again = (load_file(world.model / "model.safetensors") for world in (quick_toy_world, again))
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[key], weights_again[key]) for key in weights)

    other = make_records(ToyConfig.quick(seed=1))
    assert other["sft"] != read_jsonl(quick_toy_world.sft)


# --- formats -------------------------------------------------------------------------------------


def test_records_have_the_documented_fields(quick_toy_world):
    cfg = ToyConfig.quick()
    sft, rankings, prompts, pretrain = (read_jsonl(getattr(quick_toy_world, name))
                                        for name in ("sft", "rankings", "prompts", "pretrain"))
    assert (len(sft), len(rankings), len(prompts), len(pretrain)) == (
        cfg.n_sft_prompts, cfg.n_rm_prompts, cfg.n_rl_prompts, cfg.n_pretrain_texts)
    assert all(set(r) == {"prompt", "completion", "user_id"} for r in sft)
    assert all(set(r) == {"prompt", "responses", "user_id"} for r in rankings)
    assert all(set(r) == {"prompt", "user_id"} for r in prompts)
    assert all(set(r) == {"text"} and r["text"] for r in pretrain)
    for record in sft + rankings + prompts:
        target_answer(record["prompt"])  # parses: a well-formed toy prompt
        assert record["user_id"].startswith("user_")
    assert len({r["user_id"] for r in sft}) > 1  # several users to split by
    for record in rankings:
        responses = record["responses"]
        assert cfg.min_k <= len(responses) <= cfg.max_k
        assert len(set(responses)) == len(responses)  # no duplicates: the data layer rejects them
        scores = [gold_score(record["prompt"], answer) for answer in responses]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)  # strict best..worst
    # the three prompt sets are separate draws
    assert [r["prompt"] for r in sft[:20]] != [r["prompt"] for r in prompts[:20]]


def test_every_word_of_the_world_is_in_the_vocabulary(quick_toy_world):
    tokenizer = AutoTokenizer.from_pretrained(quick_toy_world.model, local_files_only=True)
    records = make_records(ToyConfig.quick())
    texts = [r["prompt"] + " " + r["completion"] for r in records["sft"]]
    texts += [answer for r in records["rankings"] for answer in r["responses"]]
    texts += [r["text"] for r in records["pretrain"]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)


# --- the gold labeller ---------------------------------------------------------------------------


def test_gold_score_worked_by_hand():
    prompt = "please sort : c a b ="  # target "a b c"
    assert gold_score(prompt, "a b c") == 1.0
    assert gold_score(prompt, "a b c .") == 1.0  # 1 extra token: inside the band, no cost
    assert gold_score(prompt, "a b c . ok") == 1.0  # 2 extra tokens: still inside
    assert gold_score(prompt, "a b c . ok done") == pytest.approx(1 / 1.25, abs=SCORE_TOL)  # 3 extra: 0.8
    # content = 0.5 * correctness + 0.5 * [fully correct]
    assert gold_score(prompt, "a c b") == pytest.approx(0.5 / 3, abs=SCORE_TOL)  # 1 of 3 positions right
    assert gold_score(prompt, "a b") == pytest.approx(0.5 * 2 / 3, abs=SCORE_TOL)  # the missing position is wrong
    assert gold_score(prompt, "c a b") == 0.0  # no position right
    assert gold_score(prompt, "") == 0.0  # brevity earns nothing on its own
    adding = "add : 3 5 ="  # target 8; correctness 1 - |n - 8| / 4, halved unless exact
    assert [gold_score(adding, answer) for answer in ("8", "9", "6", "12", "ok")] == [1.0, 0.375, 0.25, 0.0, 0.0]
    assert gold_score(adding, "7 ok") == 0.375  # 1 extra token costs nothing
    assert gold_score(adding, "8 . ok done sure") == pytest.approx(1 / 1.5, abs=SCORE_TOL)  # 4 extra: 2 past the band
    assert judge(prompt, "a b c . ok").extra_tokens == 2


def test_gold_score_normalises_whitespace_and_special_tokens():
    prompt = "upper : d a ="
    assert gold_score(prompt, "  D\tA \n") == 1.0
    assert gold_score(prompt, "D A<eos> ok done <pad><pad>") == 1.0  # what follows <eos> is not the answer
    assert gold_score(prompt, "D A.") == gold_score(prompt, "D A .")


def test_correct_beats_wrong_and_length_counts_only_past_the_band():
    prompt = "reverse : a b c d ="  # target "d c b a"
    concise, in_band, rambling, slightly_wrong, wrong = (
        "d c b a", "d c b a . ok", "d c b a . hope this helps", "d b c a", "a b c d")
    scores = [gold_score(prompt, answer) for answer in (concise, in_band, rambling, slightly_wrong, wrong)]
    assert scores[0] == scores[1] > scores[2] > scores[3] > scores[4] == 0.0
    # a shorter answer that drops a letter loses more than any in-band tail could
    assert gold_score(prompt, "d c b") < gold_score(prompt, "d c b a . ok") - 0.5
    # graded, not right/wrong: partial answers spread over several values
    partial = ["d c b a", "d c b x", "d c x x", "d x x x", "d c b a . ok ok", "d c b a . ok ok ok"]
    assert len({gold_score(prompt, answer) for answer in partial}) == len(partial)


def test_rank_agrees_with_gold_score_and_breaks_ties_by_input_order():
    prompt = "add : 4 4 ="
    answers = ["9 .", "8", "x", "8 . ok", "7 .", "8"]
    order = rank(prompt, answers)
    scores = [gold_score(prompt, answers[i]) for i in order]
    assert sorted(order) == list(range(len(answers))) and scores == sorted(scores, reverse=True)
    assert order[:3] == [1, 3, 5]  # "8", "8 . ok" and "8" tie (the tail is in the band); input order decides
    assert order.index(0) < order.index(2)
    assert rank(prompt, ["9 .", "7 ."]) == [0, 1] and rank(prompt, ["7 .", "9 ."]) == [0, 1]  # tie


def test_labeller_rejects_text_that_is_not_a_toy_prompt():
    with pytest.raises(DataError, match="not a toy-world prompt"):
        gold_score("what is the capital of France?", "Paris")
    with pytest.raises(DataError, match="'add' takes two numbers"):
        gold_score("add : a b =", "c")


# --- the demonstrations leave room for preference learning ---------------------------------------


def test_demonstrations_are_imperfect_and_leave_headroom_on_content_not_length():
    sft = make_records(ToyConfig(n_rm_prompts=1, n_rl_prompts=1, n_pretrain_texts=1))["sft"]
    judgements = [judge(r["prompt"], r["completion"]) for r in sft]
    assert all(gold_score(r["prompt"], " ".join(target_answer(r["prompt"]))) == 1.0 for r in sft)
    mean_gold = statistics.mean(j.score for j in judgements)
    assert 0.7 < mean_gold < 0.9  # clearly below the best possible 1.0 (about 0.81 at the defaults)
    wrong_share = statistics.mean(j.correctness < 1 for j in judgements)
    sloppy_share = statistics.mean(j.extra_tokens > 0 for j in judgements)
    assert 0.1 < wrong_share < 0.3 and 0.5 < sloppy_share < 0.7  # ~0.2 and ~0.6 by construction
    # most of the headroom is content: the demonstrations' answers cut to the target's length (length
    # factor 1) would gain ~0.04 (0.81 -> 0.85), while getting every answer right would gain ~0.15 more
    content = statistics.mean((0.5 * j.correctness + 0.5 * (j.correctness == 1)) for j in judgements)
    assert content - mean_gold < 0.05 and 1.0 - content > 0.1


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_round_trips_answers_and_keeps_pad_apart_from_eos(quick_toy_world):
    tokenizer = AutoTokenizer.from_pretrained(quick_toy_world.model, local_files_only=True)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}) == 4
    assert len(tokenizer) == len(build_tokenizer(128)) < 200
    assert tokenizer("sort : c a =").input_ids[0] == tokenizer.bos_token_id  # like Llama: <bos>, no <eos>
    for record in read_jsonl(quick_toy_world.sft):
        ids = tokenizer(record["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded == record["completion"]
        assert gold_score(record["prompt"], tokenizer.decode(ids)) == gold_score(record["prompt"], record["completion"])


# --- the written world and its model -------------------------------------------------------------


def test_quick_world_has_a_loadable_pretrained_model(quick_toy_world):
    manifest = quick_toy_world.manifest()
    assert manifest["pretrain"]["loss_end"] < manifest["pretrain"]["loss_start"] - 0.5  # ~4.4 -> ~3
    tokenizer = AutoTokenizer.from_pretrained(quick_toy_world.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(quick_toy_world.model, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    prompt = tokenizer("copy : a b =", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)  # [1, P + <=5]
    assert out.shape[1] > prompt.input_ids.shape[1]
    metrics = read_jsonl(quick_toy_world.root / "pretrain_metrics.jsonl")
    assert metrics[0]["step"] == 0 and {"train_loss", "lr"} <= set(metrics[-1])


def test_complete_world_is_reused_other_config_refused_overwrite_rewrites(tmp_path):
    world = write_toy_world(tmp_path, ToyConfig.quick(**TINY))
    stamp = world.sft.stat().st_mtime_ns
    assert write_toy_world(tmp_path, ToyConfig.quick(**TINY)) == world
    assert world.sft.stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(ConfigError, match=r"another config \(seed: 0 there vs 3 asked\)"):
        write_toy_world(tmp_path, ToyConfig.quick(**TINY), seed=3)
    write_toy_world(tmp_path, ToyConfig.quick(**TINY), seed=3, overwrite=True)
    assert world.manifest()["config"]["seed"] == 3
    assert not [path for path in os.listdir(tmp_path) if ".tmp" in path]  # no temporaries left


def test_incomplete_world_is_written_again(tmp_path):
    world = ToyWorld.at(tmp_path)
    world.sft.write_text('{"prompt": "half a file')  # a crash before the manifest was written
    write_toy_world(tmp_path, ToyConfig.quick(**TINY))
    assert world.is_complete() and len(read_jsonl(world.sft)) == ToyConfig.quick().n_sft_prompts


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(min_k=5, max_k=4), r"toy.min_k=5, toy.max_k=4: need 2 <= min_k <= max_k"),
    (dict(demo_sloppy_rate=1.5), r"toy.demo_sloppy_rate=1.5: must be in \[0, 1\]"),
    (dict(hidden_size=100, num_heads=3), r"toy.hidden_size=100: must split into toy.num_heads=3"),
    (dict(pretrain_steps=0), r"toy.pretrain_steps=0: must be >= 1"),
    (dict(seed="0"), r"toy.seed: expected int, got '0'"),
    (dict(lr=0.0), r"toy.lr=0.0: must be > 0"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ToyConfig(**overrides).validate()


def test_unknown_override_gets_a_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match="unknown field 'pretrain_step'; did you mean 'pretrain_steps'"):
        write_toy_world(tmp_path, pretrain_step=3)
    assert not list(tmp_path.iterdir())  # validated before anything is written

"""The data layer: record formats, bad input, the user-id split, tokenisation masks, truncation, padding.

Tokenizers come from tests/conftest.py (`make_data_tokenizer`): one token per word, so every expected
sequence below is written out token by token.
"""

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.data import (
    IGNORE_INDEX,
    collate_rankings,
    load_records,
    pad_left,
    pad_right,
    shift_labels,
    UserSplit,
    tokenize_pretrain,
    tokenize_prompts,
    tokenize_rankings,
    tokenize_sft,
)
from rlhf.errors import DataError, ModelError


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are, for malformed lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def token_ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

def test_sft_prompt_completion_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "what is two", "completion": "two", "user_id": 7, "extra": "ignored"},
        "",  # a blank line is skipped silently, and still counts for the line numbers below
        {"prompt": "hello", "completion": "world"},
    ])
    records = load_records(path, "sft")
    assert records == [
        {"prompt": "what is two", "completion": "two", "user_id": "7", "source": f"{path}:1"},
        {"prompt": "hello", "completion": "world", "user_id": None, "source": f"{path}:3"},
    ]
    assert records.num_skipped == 0


def test_sft_messages_jsonl(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "user_id": "u1"}])
    assert load_records(path, "sft") == [{"messages": messages, "user_id": "u1", "source": f"{path}:1"}]


def test_rankings_list_and_pairwise(tmp_path):
    path = write_jsonl(tmp_path / "rankings.jsonl", [
        {"prompt": "what is two", "responses": ["two", "three", "ten"]},
        {"prompt": "hello", "chosen": "world", "rejected": "no", "user_id": "u2"},
    ])
    records = load_records(path, "rankings")
    assert [record["responses"] for record in records] == [["two", "three", "ten"], ["world", "no"]]
    assert records[1]["user_id"] == "u2"


def test_prompts_and_pretrain(tmp_path):
    prompts = load_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello", "user_id": 3}]), "prompts")
    assert prompts == [{"prompt": "hello", "user_id": "3", "source": f"{tmp_path / 'p.jsonl'}:1"}]
    pretrain = load_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}]), "pretrain")
    assert pretrain[0]["text"] == "the cat sat" and pretrain[0]["source"].endswith("t.jsonl:1")


def test_parquet_rows_name_their_row(tmp_path):
    # A columnar file fills the fields a row lacks with null; null counts as absent.
    path = write_parquet(tmp_path / "rankings.parquet", [
        {"prompt": "hello", "responses": ["world", "no"], "chosen": None, "rejected": None, "user_id": 5},
        {"prompt": "what is two", "responses": None, "chosen": "two", "rejected": "ten", "user_id": None},
    ])
    records = load_records(path, "rankings")
    assert records == [
        {"prompt": "hello", "responses": ["world", "no"], "user_id": "5", "source": f"{path}:row 0"},
        {"prompt": "what is two", "responses": ["two", "ten"], "user_id": None, "source": f"{path}:row 1"},
    ]


def test_user_ids_written_by_pandas(tmp_path):
    # pandas stores an integer column with gaps as floats, the gaps as NaN
    path = write_parquet(tmp_path / "prompts.parquet", [{"prompt": "hello", "user_id": 3.0},
                                                        {"prompt": "hello", "user_id": float("nan")}])
    assert [record["user_id"] for record in load_records(path, "prompts")] == ["3", None]


def test_parquet_messages(tmp_path):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    path = write_parquet(tmp_path / "chat.parquet", [{"messages": messages}])
    assert load_records(path, "sft")[0]["messages"] == messages


def test_directory_of_files_and_saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "hello"}])
    write_parquet(folder / "b.parquet", [{"prompt": "what is two"}])
    (folder / "README.md").write_text("not data, not read")
    assert [r["source"] for r in load_records(folder, "prompts")] == [f"{folder / 'a.jsonl'}:1",
                                                                      f"{folder / 'b.parquet'}:row 0"]

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "the cat"}, {"text": "sat"}]).save_to_disk(str(saved))
    assert [r["text"] for r in load_records(saved, "pretrain")] == ["the cat", "sat"]


def test_json_array_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "hello"}, {"prompt": ""}]))
    with pytest.raises(DataError, match=r'prompts\.json:row 1: field "prompt": is empty'):
        load_records(path, "prompts")


# ---------------------------------------------------------------------------------------------
# Bad input: each case names file:line and field. Line 1 is good, the bad record is on line 2.
# ---------------------------------------------------------------------------------------------

GOOD_LINE = {
    "sft": {"prompt": "hello", "completion": "world"},
    "rankings": {"prompt": "hello", "responses": ["world", "no"]},
    "prompts": {"prompt": "hello"},
    "pretrain": {"text": "hello"},
}
BAD_RECORDS = [
    # (kind, line 2, what the error must say after "file:2: ")
    ("sft", '{"prompt": "hello", "completion": }', r"malformed JSON: Expecting value at column 35"),
    ("sft", '["hello", "world"]', r"expected a JSON object .*, got a list"),
    ("sft", {"prompt": "hello"}, r'field "completion": missing; sft records look like'),
    ("sft", {"prompt": "hello", "completion": ["world"]}, r'field "completion": expected a string, got a list'),
    ("sft", {"prompt": "  ", "completion": "world"}, r'field "prompt": is empty'),
    ("sft", {"prompt": "hello", "completion": ""}, r'field "completion": is empty'),
    ("sft", {"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "no"}]},
     r'field "messages\[1\]\.role": the last message is the answer and must have role "assistant"'),
    ("sft", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "no"}]},
     r'field "messages\[0\]\.content": expected a string, got a number'),
    ("sft", {"messages": [{"role": "assistant", "content": "no"}]}, r'field "messages": need the prompt'),
    ("sft", {"prompt": "hello", "completion": "world", "user_id": ["u1"]},
     r'field "user_id": expected a string or an integer, got a list'),
    ("sft", {"prompt": "hello", "completion": "world", "messages": [{"role": "user", "content": "hello"}]},
     r'field "messages": has both "messages" and "prompt"/"completion"'),
    ("rankings", {"prompt": "hello", "responses": ["world"]}, r'field "responses": need at least 2 answers, got 1'),
    ("rankings", {"prompt": "hello", "responses": ["yes", "no", "yes"]},
     r'field "responses": responses\[0\] and responses\[2\] are the same text'),
    ("rankings", {"prompt": "hello", "responses": ["yes", ""]}, r'field "responses\[1\]": is empty'),
    ("rankings", {"prompt": "hello", "responses": "yes"}, r'field "responses": expected a list of answers'),
    ("rankings", {"prompt": "hello", "chosen": "yes", "rejected": "yes"}, r'field "rejected": same text as "chosen"'),
    ("rankings", {"prompt": "hello", "chosen": "yes"}, r'field "rejected": missing'),
    ("rankings", {"responses": ["yes", "no"]}, r'field "prompt": missing'),
    ("prompts", {"question": "hello"}, r'field "prompt": missing; prompts records look like \{"prompt": \.\.\.\}'),
    ("pretrain", {"text": 12}, r'field "text": expected a string, got a number \(12\)'),
]


@pytest.mark.parametrize("kind, bad_line, message", BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, kind, bad_line, message):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [GOOD_LINE[kind], bad_line])
    with pytest.raises(DataError, match=rf"{kind}\.jsonl:2: {message}"):
        load_records(path, kind)


def test_bad_parquet_row_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "sft.parquet", [{"prompt": "hello", "completion": "world"},
                                                    {"prompt": "hello", "completion": " "}])
    with pytest.raises(DataError, match=r'sft\.parquet:row 1: field "completion": is empty'):
        load_records(path, "sft")


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or directory"):
        load_records(tmp_path / "missing.jsonl", "sft")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_records(tmp_path / "empty.jsonl", "sft")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no records"):
        load_records(tmp_path / "blank.jsonl", "sft")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unknown data file type '\.txt'"):
        load_records(tmp_path / "notes.txt", "pretrain")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: no data files in this directory"):
        load_records(tmp_path / "nothing", "sft")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:1: not valid UTF-8"):
        load_records(tmp_path / "latin1.jsonl", "pretrain")


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    path = write_jsonl(tmp_path / "rankings.jsonl", [
        {"prompt": "hello", "responses": ["world", "no"]},
        {"prompt": "hello", "responses": ["world"]},  # too few responses
        "{not json",  # malformed JSON
        {"prompt": "hello", "responses": ["yes", "yes"]},  # duplicate responses
        {"prompt": "hello", "responses": ["world"]},  # too few responses
        {"prompt": "what is two", "chosen": "two", "rejected": "ten"},
    ])
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        records = load_records(path, "rankings", skip_invalid=True)
    assert [record["source"] for record in records] == [f"{path}:1", f"{path}:6"]
    assert records.skipped == {"too few responses": 2, "malformed JSON": 1, "duplicate responses": 1}
    assert records.num_skipped == 4
    assert records.skipped_summary() == (
        "skipped 4 records: 2 too few responses, 1 malformed JSON, 1 duplicate responses")
    assert f"{path}:2: field \"responses\": need at least 2 answers, got 1" in caplog.text  # each skip, with reason
    assert "skipped 4 records" in caplog.text  # and the summary


def test_skip_invalid_with_no_valid_record_still_fails(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hello"}, {"completion": "world"}])
    with pytest.raises(DataError, match=r"all 2 sft records are invalid \(skipped 2 records: 2 missing field\)"):
        load_records(path, "sft", skip_invalid=True)


# ---------------------------------------------------------------------------------------------
# Split by user id
# ---------------------------------------------------------------------------------------------

def test_split_does_not_depend_on_python_hash_seed():
    # Load split.py on its own (it imports nothing of ours) in a process with another PYTHONHASHSEED.
    split_file = Path(__file__).resolve().parents[1] / "rlhf" / "data" / "split.py"
    records = [{"user_id": f"user-{i % 7}", "source": str(i)} for i in range(40)] + [
        {"prompt": f"p{i}", "user_id": None, "source": f"none-{i}"} for i in range(10)]
    child = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('split', {str(split_file)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['split'] = module\n"  # for its dataclass
        "spec.loader.exec_module(module)\n"
        "records = json.load(sys.stdin)\n"
        "test = module.UserSplit(seed=3, tune_fraction=0.25, test_fraction=0.25).select(records, 'test')\n"
        "print(json.dumps([r['source'] for r in test]))\n"
    )
    test_sources = []
    for hash_seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", child], input=json.dumps(records), capture_output=True,
                                text=True, check=True, env={"PYTHONHASHSEED": hash_seed})
        test_sources.append(json.loads(result.stdout))
    test = UserSplit(seed=3, tune_fraction=0.25, test_fraction=0.25).select(records, "test")
    assert test_sources[0] == test_sources[1] == [r["source"] for r in test] != []


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------

def sft_record(prompt: str, completion: str, source: str = "sft.jsonl:1") -> dict:
    return {"prompt": prompt, "completion": completion, "user_id": None, "source": source}


def test_sft_answer_mask_by_hand(make_data_tokenizer):
    tokenizer = make_data_tokenizer(add_bos=True, chat_template=False)
    examples, report = tokenize_sft([sft_record("what is two plus two", "four")], tokenizer, max_length=32)
    # <bos> what is two plus two | four <eos>: one BOS (the tokenizer's, added once), loss on "four <eos>"
    assert examples[0]["input_ids"] == token_ids(tokenizer, "<bos> what is two plus two four <eos>")
    assert examples[0]["answer_mask"] == [False] * 6 + [True] * 2
    assert (report.truncated_prompts, report.dropped_too_long, report.num_kept) == (0, 0, 1)

    no_bos = make_data_tokenizer(add_bos=False, chat_template=False)
    examples, _ = tokenize_sft([sft_record("what is two plus two", "four")], no_bos, max_length=32)
    assert examples[0]["input_ids"] == token_ids(no_bos, "what is two plus two four <eos>")
    assert examples[0]["answer_mask"] == [False] * 5 + [True] * 2


def test_sft_messages_use_the_chat_template(data_tokenizer):
    record = {"messages": [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "two"}],
              "user_id": None, "source": "chat.jsonl:1"}
    examples, _ = tokenize_sft([record], data_tokenizer, max_length=32)
    # The template writes <bos> itself; tokenising with add_special_tokens=False keeps it single.
    # The answer is what the full chat adds to the prompt: "two <|end|>", then our <eos>.
    assert examples[0]["input_ids"] == token_ids(
        data_tokenizer, "<bos> <|user|> what is two <|end|> <|assistant|> two <|end|> <eos>")
    assert examples[0]["answer_mask"] == [False] * 7 + [True] * 3
    # a plain record with use_chat_template=True is the same chat
    plain, _ = tokenize_sft([sft_record("what is two", "two")], data_tokenizer, max_length=32, use_chat_template=True)
    assert plain[0]["input_ids"] == examples[0]["input_ids"]


def test_chat_records_need_a_usable_template(make_data_tokenizer):
    record = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
              "user_id": None, "source": "chat.jsonl:4"}
    with pytest.raises(DataError, match=r"chat\.jsonl:4: a chat-formatted record needs the tokenizer's chat_template"):
        tokenize_sft([record], make_data_tokenizer(chat_template=False), max_length=32)
    tokenizer = make_data_tokenizer()
    # A template whose generation prompt is not how the answer turn starts: the answer cannot be located.
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    with pytest.raises(ModelError, match=r"chat\.jsonl:4: the tokenizer's chat template renders the prompt"):
        tokenize_sft([record], tokenizer, max_length=32)


def test_sft_truncates_the_prompt_from_the_left_and_drops_what_cannot_fit(make_data_tokenizer, caplog):
    tokenizer = make_data_tokenizer(add_bos=True, chat_template=False)
    records = [
        sft_record("one two three four five six", "seven", "sft.jsonl:1"),  # 1 + 6 + 2 = 9 tokens
        sft_record("one two", "three four five six seven eight", "sft.jsonl:2"),  # 1 + 2 + 7 = 10
        sft_record("hello", "world", "sft.jsonl:3"),  # 4 tokens, fits
    ]
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        examples, report = tokenize_sft(records, tokenizer, max_length=7, min_prompt_tokens=2)
    # record 1: room for 7 - 1 (bos) - 2 (answer) = 4 prompt tokens: its end "three four five six" is kept
    assert examples[0]["input_ids"] == token_ids(tokenizer, "<bos> three four five six seven <eos>")
    assert examples[0]["answer_mask"] == [False] * 5 + [True] * 2
    # record 2: room for 7 - 1 - 7 = -1 prompt tokens, fewer than min(2, 2): dropped, never cut
    assert [example["source"] for example in examples] == ["sft.jsonl:1", "sft.jsonl:3"]
    assert examples[1]["input_ids"] == token_ids(tokenizer, "<bos> hello world <eos>")
    assert (report.num_records, report.truncated_prompts, report.dropped_too_long, report.num_kept) == (3, 1, 1, 2)
    assert "sft: 3 records, 1 prompts truncated from the left, 1 dropped" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        examples, report = tokenize_sft(records[1:2], tokenizer, max_length=7, min_prompt_tokens=2)
    assert examples == [] and report.dropped_too_long == 1
    assert "every example was dropped; raise max_length (now 7)" in caplog.text


def test_sft_truncation_never_cuts_the_answer_end(make_data_tokenizer):
    tokenizer = make_data_tokenizer(add_bos=True, chat_template=False)
    words = "one two three four five six seven eight nine ten".split()
    rng = random.Random(0)
    for _ in range(100):
        prompt = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        answer = " ".join(rng.choices(words, k=rng.randint(1, 8)))
        max_length = rng.randint(3, 16)
        examples, report = tokenize_sft([sft_record(prompt, answer)], tokenizer, max_length, min_prompt_tokens=1)
        if 1 + 1 + len(answer.split()) + 1 > max_length:  # bos + 1 prompt token + answer + eos cannot fit
            assert examples == [] and report.dropped_too_long == 1
            continue
        (example,) = examples
        expected_answer = token_ids(tokenizer, answer + " <eos>")
        assert len(example["input_ids"]) <= max_length
        assert example["input_ids"][-len(expected_answer):] == expected_answer
        assert example["answer_mask"] == [False] * (len(example["input_ids"]) - len(expected_answer)) + [True] * len(
            expected_answer)
        assert example["input_ids"][0] == tokenizer.bos_token_id
        prompt_kept = example["input_ids"][1:-len(expected_answer)]
        assert prompt_kept == token_ids(tokenizer, prompt)[-len(prompt_kept):]  # the prompt's end
        assert report.truncated_prompts == (len(prompt_kept) < len(prompt.split()))


def test_rankings_share_one_prompt_cut_for_the_longest_answer(make_data_tokenizer):
    tokenizer = make_data_tokenizer(add_bos=True, chat_template=False)
    record = {"prompt": "one two three four", "responses": ["yes", "no good bad"], "user_id": None, "source": "r:1"}
    examples, report = tokenize_rankings([record], tokenizer, max_length=7, min_prompt_tokens=1)
    # longest answer "no good bad <eos>" is 4 tokens: room for 7 - 1 - 4 = 2 prompt tokens, for both answers
    assert examples[0]["input_ids"] == [token_ids(tokenizer, "<bos> three four yes <eos>"),
                                        token_ids(tokenizer, "<bos> three four no good bad <eos>")]
    assert examples[0]["answer_start"] == [3, 3]
    assert (report.truncated_prompts, report.dropped_too_long) == (1, 0)

    too_long = dict(record, responses=["yes", "one two three four five six"], source="r:2")
    examples, report = tokenize_rankings([record, too_long], tokenizer, max_length=7, min_prompt_tokens=1)
    assert [example["source"] for example in examples] == ["r:1"]
    assert report.dropped_too_long == 1


def test_prompts_are_cut_from_the_left_keeping_bos(make_data_tokenizer):
    tokenizer = make_data_tokenizer(add_bos=True)
    records = [{"prompt": "one two three four five", "user_id": "u", "source": "p:1"},
               {"prompt": "hello", "user_id": None, "source": "p:2"}]
    examples, report = tokenize_prompts(records, tokenizer, max_prompt_length=4, use_chat_template=False)
    assert [e["input_ids"] for e in examples] == [token_ids(tokenizer, "<bos> three four five"),
                                                  token_ids(tokenizer, "<bos> hello")]
    assert examples[0]["prompt"] == "one two three four five" and examples[0]["user_id"] == "u"
    assert report.truncated_prompts == 1

    chat, _ = tokenize_prompts(records[1:], tokenizer, max_prompt_length=16, use_chat_template=True)
    assert chat[0]["input_ids"] == token_ids(tokenizer, "<bos> <|user|> hello <|end|> <|assistant|>")


def test_pretrain_chunks_keep_every_token(make_data_tokenizer):
    tokenizer = make_data_tokenizer(add_bos=False)
    records = [{"text": "the cat sat on the mat", "source": "t:1"}, {"text": "hello world", "source": "t:2"}]
    examples, report = tokenize_pretrain(records, tokenizer, max_length=4)
    first = token_ids(tokenizer, "the cat sat on the mat <eos>")  # 7 tokens -> pieces of 4 and 3
    second = token_ids(tokenizer, "hello world <eos>")  # 3 tokens, its own sequence: no packing
    assert [e["input_ids"] for e in examples] == [first[0:4], first[4:7], second]
    assert (report.num_tokens, report.num_chunks) == (10, 3)


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------

PAD = 0


def test_pad_right_for_training():
    batch = pad_right([[5, 6, 7], [8]], PAD, answer_masks=[[False, True, True], [True]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["answer_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
    # without answer masks (pretraining text) every real token carries loss
    assert pad_right([[5, 6], [7]], PAD)["answer_mask"].tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError, match="row 0: answer mask has 1 entries for 2 tokens"):
        pad_right([[5, 6]], PAD, answer_masks=[[True]])


def test_pad_left_for_generation():
    batch = pad_left([[5, 6, 7], [8]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]  # prompts end in the last column
    assert batch["attention_mask"].tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="pad token"):
        pad_left([[5]], None)


def test_shift_labels():
    batch = pad_right([[5, 6, 7, 8], [9, 10, 11]], PAD,
                      answer_masks=[[False, False, True, True], [False, True, True]])
    labels = shift_labels(batch["input_ids"], batch["answer_mask"])
    # position t is labelled with the token at t + 1 when that token is an answer token;
    # row 1's last column is padding, and no row's last column has a next token
    assert labels.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX],
                               [10, 11, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_rankings_flattens_answers(make_data_tokenizer):
    examples = [{"input_ids": [[1, 5, 6], [1, 5, 7, 8]], "answer_start": [2, 2]},
                {"input_ids": [[1, 9], [1, 10], [1, 11]], "answer_start": [1, 1, 1]}]
    batch = collate_rankings(examples, PAD)
    assert batch["input_ids"].shape == (5, 4)  # M = 2 + 3 answers, S = 4
    assert batch["answer_mask"][1].tolist() == [False, False, True, True]
    assert batch["answer_mask"][0].tolist() == [False, False, True, False]
    assert batch["prompt_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["rank"].tolist() == [0, 1, 0, 1, 2]

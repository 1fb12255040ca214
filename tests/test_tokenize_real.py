"""Real tokenizers done right, pinned with SmolLM2-135M-Instruct's own tokenizer (byte-level BPE,
ChatML template, pad = EOS = `<|im_end|>`, BOS `<|im_start|>` that it never adds) and with the word-level
test tokenizers of conftest.py (a BOS it adds, a template that writes `{{ bos_token }}`).

What each test pins: the EOS that ends an answer is a real token (SFT labels, the RM's last token, the
rollout mask) although pad == EOS; the template's end-of-turn token ends the answer exactly once; the
prompt the policy samples from is the prompt it was trained on (one `use_chat_template` switch); BOS
appears as the tokenizer adds it, once; truncation never cuts the answer's EOS silently.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.data import (
    collate_rankings,
    pad_left,
    pad_right,
    resolve_chat_template,
    shift_labels,
    tokenize_prompts,
    tokenize_rankings,
    tokenize_sft,
)
from rlhf.errors import DataError
from rlhf.models import last_true_index, load_tokenizer
from rlhf.ppo.rollout import answer_mask_from

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def record(prompt=QUESTION, completion=ANSWER, source="sft.jsonl:1"):
    return {"prompt": prompt, "completion": completion, "user_id": None, "source": source}


def chat(prompt=QUESTION):
    return [{"role": "user", "content": prompt}]


def test_smollm2_keeps_its_own_pad_which_is_the_eos(smol, smollm2_dir):
    # nothing added: the vocabulary (and so the LM head's softmax) is the model's own
    assert smol.pad_token == smol.eos_token == "<|im_end|>"
    assert len(smol) == 49152
    assert smol.chat_template and smol.bos_token == "<|im_start|>"
    assert smol("hello")["input_ids"] == smol("hello", add_special_tokens=False)["input_ids"]  # adds no BOS


def test_chatml_answer_ends_at_the_templates_im_end_exactly_once(smol):
    (example,), _ = tokenize_sft([record()], smol, max_length=128)
    ids, mask = example["input_ids"], example["answer_mask"]
    full = smol.apply_chat_template(chat() + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert full.endswith("<|im_end|>\n")  # the template's own turn end, then the newline before a next turn
    # the sequence is the template's rendering up to and including that <|im_end|>: no "\n", no second EOS
    assert smol.decode(ids) == full[:-1]
    assert ids[-1] == smol.eos_token_id and ids[-2] != smol.eos_token_id
    answer_ids = [i for i, m in zip(ids, mask) if m]
    assert smol.decode(answer_ids) == ANSWER + "<|im_end|>"
    assert answer_ids.count(smol.eos_token_id) == 1
    # the split tokenisation (prompt ids + answer ids) is the tokenisation of the whole text: the answer
    # boundary is exact and the policy continues exactly these prompt ids
    assert ids == smol(full[:-1], add_special_tokens=False)["input_ids"]


def test_the_prompt_trained_on_is_the_prompt_sampled_from(smol):
    (sft_example,), _ = tokenize_sft([record()], smol, max_length=128)
    (prompt_example,), _ = tokenize_prompts([record()], smol, max_prompt_length=128)
    prompt_ids = prompt_example["input_ids"]
    assert sft_example["input_ids"][:len(prompt_ids)] == prompt_ids
    assert sft_example["answer_mask"] == [False] * len(prompt_ids) + [True] * (len(sft_example["input_ids"]) - len(prompt_ids))
    rendered = smol.apply_chat_template(chat(), tokenize=False, add_generation_prompt=True)
    assert smol.decode(prompt_ids) == rendered and rendered.endswith("<|im_start|>assistant\n")
    # the RM's rankings and the labeller's/evaluation's prompts use the same rendering
    (ranking,), _ = tokenize_rankings([{"prompt": QUESTION, "responses": [ANSWER, "Lyon."], "user_id": None,
                                        "source": "r:1"}], smol, max_length=128)
    assert ranking["input_ids"][0] == sft_example["input_ids"]
    assert ranking["answer_start"] == [len(prompt_ids)] * 2
    assert smol.decode(ranking["input_ids"][1][len(prompt_ids):]) == "Lyon.<|im_end|>"


def test_one_switch_auto_true_false(smol, make_data_tokenizer):
    assert resolve_chat_template("auto", smol) is True
    assert resolve_chat_template("auto", make_data_tokenizer(chat_template=False)) is False
    auto, _ = tokenize_sft([record()], smol, max_length=128)
    on, _ = tokenize_sft([record()], smol, max_length=128, use_chat_template=True)
    off, _ = tokenize_sft([record()], smol, max_length=128, use_chat_template=False)
    assert auto == on and off != on
    # off: the texts as written, joined, then one EOS; no template tokens and no BOS (SmolLM2 adds none)
    assert off[0]["input_ids"] == smol(QUESTION + ANSWER, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    (plain_prompt,), _ = tokenize_prompts([record()], smol, max_prompt_length=128, use_chat_template=False)
    assert plain_prompt["input_ids"] == smol(QUESTION, add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="data.use_chat_template=true but the tokenizer has no chat_template"):
        tokenize_prompts([record()], make_data_tokenizer(chat_template=False), 16, use_chat_template=True)


def test_bos_as_the_tokenizer_adds_it(smol, make_data_tokenizer):
    # SmolLM2 adds no BOS: the template's leading <|im_start|> (which the tokenizer names its BOS) is
    # prompt text, appears once, and is not made a truncation-proof head
    (example,), _ = tokenize_prompts([record()], smol, max_prompt_length=128)
    assert example["input_ids"][0] == smol.bos_token_id and example["input_ids"][1] != smol.bos_token_id
    (cut,), report = tokenize_prompts([record()], smol, max_prompt_length=12)
    assert report.truncated_prompts == 1 and cut["input_ids"] == example["input_ids"][-12:]
    # a tokenizer that adds its BOS, with a template that writes it: exactly one BOS, kept by truncation
    tokenizer = make_data_tokenizer(add_bos=True)
    words = {"prompt": "one two three four five six", "user_id": None, "source": "p:1"}
    (full,), _ = tokenize_prompts([words], tokenizer, max_prompt_length=64)
    assert full["input_ids"].count(tokenizer.bos_token_id) == 1 and full["input_ids"][0] == tokenizer.bos_token_id
    (cut,), _ = tokenize_prompts([words], tokenizer, max_prompt_length=4)
    assert cut["input_ids"] == [tokenizer.bos_token_id] + full["input_ids"][-3:]


def test_truncation_never_cuts_the_answers_eos(smol):
    long_question = "Please answer briefly. " * 20 + QUESTION
    (example,), report = tokenize_sft([record(long_question)], smol, max_length=40, min_prompt_tokens=8)
    assert len(example["input_ids"]) == 40 and report.truncated_prompts == 1
    assert example["input_ids"][-1] == smol.eos_token_id
    assert smol.decode([i for i, m in zip(example["input_ids"], example["answer_mask"]) if m]) == ANSWER + "<|im_end|>"
    # an answer that cannot fit whole is dropped and counted, never cut
    examples, report = tokenize_sft([record(completion=ANSWER * 8)], smol, max_length=40, min_prompt_tokens=8)
    assert examples == [] and report.dropped_too_long == 1


def test_eos_counts_in_sft_labels_and_rm_last_token_although_pad_is_eos(smol):
    examples, _ = tokenize_sft([record(), record(completion="Paris.")], smol, max_length=128)
    pad_id = smol.pad_token_id
    assert pad_id == smol.eos_token_id
    batch = pad_right([e["input_ids"] for e in examples], pad_id, [e["answer_mask"] for e in examples])
    labels = shift_labels(batch["input_ids"], batch["answer_mask"])  # [B, S]
    short = len(examples[1]["input_ids"])
    # the short row: its EOS is the label of the position before it; the padding after it (also the EOS
    # id) has no label, because masks come from lengths, not from `ids != pad`
    assert labels[1, short - 2] == smol.eos_token_id
    assert (batch["input_ids"][1, short:] == pad_id).all() and (labels[1, short - 1:] == -100).all()
    assert int((labels == smol.eos_token_id).sum()) == 2  # one EOS label per row, none for padding
    # the RM scores each answer at its last real token: the EOS, not a pad position
    rankings, _ = tokenize_rankings([{"prompt": QUESTION, "responses": [ANSWER, "Paris."], "user_id": None,
                                      "source": "r:1"}], smol, max_length=128)
    ranked = collate_rankings(rankings, pad_id)
    last = last_true_index(ranked["attention_mask"])  # [M]
    assert (ranked["input_ids"][torch.arange(2), last] == smol.eos_token_id).all()
    assert last.tolist() == [len(ids) - 1 for ids in rankings[0]["input_ids"]]


def test_left_padded_prompts_and_rollout_mask_with_pad_equal_to_eos(smol):
    prompts, _ = tokenize_prompts([record(), record("Hi")], smol, max_prompt_length=128)
    padded = pad_left([p["input_ids"] for p in prompts], smol.pad_token_id)  # [B, P]
    lengths = [len(p["input_ids"]) for p in prompts]
    assert padded["attention_mask"].sum(dim=1).tolist() == lengths
    assert padded["attention_mask"][:, -1].all()  # every prompt ends in the last column
    # a sampled answer: "Paris" <|im_end|>, then the sampler's padding (the EOS id again)
    eos, paris = smol.eos_token_id, smol("Paris", add_special_tokens=False)["input_ids"]
    answers = torch.tensor([paris + [eos, eos, eos], paris + [11, 12, 13]])  # [B, T]; row 1 never stops
    mask, ended = answer_mask_from(answers, eos)
    assert mask[0].tolist() == [True] * (len(paris) + 1) + [False, False]  # the EOS counts, its padding not
    assert mask[1].all() and ended.tolist() == [True, False]


def test_chatml_style_end_of_turn_with_the_word_level_tokenizer(make_data_tokenizer):
    # the same rule on the toy-sized tokenizer: a template that ends the assistant turn with <eos> and a
    # separator ("<eos> ") gives one <eos>; the conftest template (turn end <|end|>) keeps it and appends <eos>
    tokenizer = make_data_tokenizer(add_bos=False)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    (example,), _ = tokenize_sft([record("what is two", "two")], tokenizer, max_length=32)
    assert tokenizer.convert_ids_to_tokens(example["input_ids"]) == [
        "<|user|>", "what", "is", "two", "<eos>", "<|assistant|>", "two", "<eos>"]
    assert example["answer_mask"] == [False] * 6 + [True] * 2
    (other,), _ = tokenize_sft([record("what is two", "two")], make_data_tokenizer(add_bos=False), max_length=32)
    assert tokenizer.convert_ids_to_tokens(other["input_ids"])[-3:] == ["two", "<|end|>", "<eos>"]

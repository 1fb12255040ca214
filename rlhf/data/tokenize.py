"""Turning records into token ids, with the masks that say where the answer is.

A training sequence is `head + prompt + answer`:
  head    the tokens the tokenizer puts before any text (a BOS for Llama-style tokenizers, nothing for
          GPT-2, Qwen2 or SmolLM2), exactly once: for chat-rendered prompts the template writes it (its
          `{{ bos_token }}`), and a leading token is the head only when it is that same BOS; never truncated
  prompt  the prompt's tokens (the chat template's rendering of the prompt messages plus the generation
          prompt, when the chat template is used; see `use_chat_template` below)
  answer  the answer's tokens ending with exactly one EOS, the token the sampler stops at, so the model
          learns to stop where rollouts stop. With a chat template whose end-of-turn token is the EOS
          (ChatML: Qwen-instruct, SmolLM2 end a turn with `<|im_end|>`), the answer ends at that token
          and the template's text after it (the newline before the next turn) is not part of the
          answer: `4.<|im_end|>`, never `4.<|im_end|>\n<|im_end|>`. Otherwise EOS is appended.

`use_chat_template` is one switch for every stage (SFT, RM, labelling, PPO rollouts, evaluation), so
the policy is trained and scored on the text it sees at rollout time: "auto" (the default) renders
plain prompt/completion records through the tokenizer's chat template when it has one, True requires
one, False writes the texts as they are. Records in "messages" form always use the template.

Prompt and answer are tokenised separately and their ids concatenated, so the answer boundary is exact
and matches generation (the policy continues the prompt's ids). With plain prompt/completion records
the texts are joined exactly as written: put any separator (a space, a newline) in the data. Texts are
tokenised with `add_special_tokens=False` and the head is added once by us, which avoids a double BOS.

Truncation never cuts an answer: when a sequence is longer than `max_length` the prompt loses tokens
from its left (its end, where the question usually sits, is kept) down to `min_prompt_tokens`; if the
answer still does not fit, the example is dropped. Both are counted in a `TruncationReport` and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from rlhf.errors import DataError, ModelError

if TYPE_CHECKING:  # transformers is a heavy import; the functions only call methods on the tokenizer
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# ours: a prompt cut below this many tokens has usually lost what was asked, so the example is dropped
DEFAULT_MIN_PROMPT_TOKENS = 16


@dataclass
class TruncationReport:
    """What tokenising one set of records cut or dropped, so that nothing is lost silently."""

    kind: str  # "sft", "rankings", "prompts" or "pretrain"
    max_length: int  # the sequence limit (for prompts: max_prompt_length)
    num_records: int = 0
    truncated_prompts: int = 0  # prompts cut from the left to fit max_length
    dropped_too_long: int = 0  # examples dropped: the answer did not fit even after cutting the prompt
    num_tokens: int = 0  # pretrain only: tokens in all chunks together
    num_chunks: int = 0  # pretrain only: sequences of at most max_length tokens

    @property
    def num_kept(self) -> int:
        return self.num_records - self.dropped_too_long

    def summary(self) -> str:
        if self.kind == "pretrain":
            return (f"pretrain: {self.num_records} documents, {self.num_tokens} tokens in {self.num_chunks} "
                    f"chunks of at most {self.max_length} tokens (nothing dropped)")
        if self.kind == "prompts":
            return (f"prompts: {self.num_records} records, {self.truncated_prompts} truncated from the left "
                    f"to max_prompt_length={self.max_length}")
        return (f"{self.kind}: {self.num_records} records, {self.truncated_prompts} prompts truncated from "
                f"the left, {self.dropped_too_long} dropped (answer too long for max_length={self.max_length})")

    def log(self) -> None:
        """Warns when something was cut or dropped; the stage decides whether too little is left."""
        lost_something = self.truncated_prompts or self.dropped_too_long
        (logger.warning if lost_something else logger.info)("%s", self.summary())
        if self.num_records and self.dropped_too_long == self.num_records:
            logger.warning("%s: every example was dropped; raise max_length (now %d) or shorten the answers",
                           self.kind, self.max_length)


def tokenize_sft(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
    use_chat_template: bool | str = "auto",
) -> tuple[list[dict], TruncationReport]:
    """SFT records -> examples {"input_ids": list[int], "answer_mask": list[bool], "source": str}.

    `answer_mask` is True on the answer's tokens and its EOS (the tokens that carry the loss), False on
    the head and the prompt. `use_chat_template` (see the module docstring) renders plain prompt/completion
    records as a user turn and an assistant turn; records in "messages" form always use the template.
    """
    _check_lengths(max_length, min_prompt_tokens)
    report = TruncationReport("sft", max_length, num_records=len(records))
    answers_of = [[record["messages"][-1]["content"] if "messages" in record else record["completion"]]
                  for record in records]
    examples = []
    for record, encoded in zip(records, _encode(records, answers_of, tokenizer, use_chat_template)):
        head, (answer_ids,) = encoded.head, encoded.answers_ids
        prompt_ids = _fit_prompt(encoded.prompt_ids, len(head) + len(answer_ids), max_length, min_prompt_tokens,
                                 report, _source(record))
        if prompt_ids is None:
            continue
        examples.append({
            "input_ids": head + prompt_ids + answer_ids,
            "answer_mask": [False] * (len(head) + len(prompt_ids)) + [True] * len(answer_ids),
            "source": _source(record),
        })
    report.log()
    return examples, report


def tokenize_rankings(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
    use_chat_template: bool | str = "auto",
) -> tuple[list[dict], TruncationReport]:
    """Rankings -> examples {"input_ids": K lists (best first), "answer_start": K ints, "source": str}.

    Sequence k is `head + prompt + response_k + EOS`; `answer_start[k]` is the index of its first
    answer token. All K share one prompt, cut once to fit the longest response, so the answers are
    compared on the same context; if the longest does not fit, the whole ranking is dropped (dropping
    only long answers would teach the reward model that long answers never appear).
    """
    _check_lengths(max_length, min_prompt_tokens)
    report = TruncationReport("rankings", max_length, num_records=len(records))
    examples = []
    answers_of = [record["responses"] for record in records]
    for record, encoded in zip(records, _encode(records, answers_of, tokenizer, use_chat_template)):
        head, answers_ids = encoded.head, encoded.answers_ids
        longest_answer = max(len(answer_ids) for answer_ids in answers_ids)
        prompt_ids = _fit_prompt(encoded.prompt_ids, len(head) + longest_answer, max_length, min_prompt_tokens,
                                 report, _source(record))
        if prompt_ids is None:
            continue
        examples.append({
            "input_ids": [head + prompt_ids + answer_ids for answer_ids in answers_ids],
            "answer_start": [len(head) + len(prompt_ids)] * len(answers_ids),
            "source": _source(record),
        })
    report.log()
    return examples, report


def tokenize_prompts(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    use_chat_template: bool | str = "auto",
) -> tuple[list[dict], TruncationReport]:
    """Prompts for generation -> {"input_ids": list[int], "prompt": str, "user_id", "source"}.

    The prompt is cut from the left to `max_prompt_length` tokens (head included), never dropped.
    Records of any kind work: a "messages" record's prompt is every message before the answer. "prompt"
    is the record's prompt text (for "messages" records, the rendered prompt) for judges that read text.
    """
    _check_lengths(max_prompt_length, min_prompt_tokens=1)
    report = TruncationReport("prompts", max_prompt_length, num_records=len(records))
    examples = []
    for record, encoded in zip(records, _encode(records, [[] for _ in records], tokenizer, use_chat_template)):
        head, prompt_ids = encoded.head, encoded.prompt_ids
        budget = max_prompt_length - len(head)
        if budget < 1:
            raise ValueError(f"max_prompt_length={max_prompt_length} leaves no room after the {len(head)} head tokens")
        if len(prompt_ids) > budget:
            prompt_ids = prompt_ids[-budget:]
            report.truncated_prompts += 1
        examples.append({"input_ids": head + prompt_ids, "prompt": record.get("prompt", encoded.prompt_text),
                         "user_id": record.get("user_id"), "source": _source(record)})
    report.log()
    return examples, report


def tokenize_pretrain(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> tuple[list[dict], TruncationReport]:
    """Plain text -> chunks {"input_ids": list[int]} of at most `max_length` tokens; every token is kept.

    Each document becomes `head + text + EOS`, cut every `max_length` tokens when it is longer (the
    last piece may be shorter). Documents are not packed together: a model pretrained on one document
    per sequence (as the toy base is) sees the same layout here, and no attention crosses documents.
    """
    _check_lengths(max_length, min_prompt_tokens=1)
    head = _special_prefix(tokenizer)
    eos_id = _eos_id(tokenizer)
    examples = []
    num_tokens = 0
    for text_ids in _encode_texts(tokenizer, [record["text"] for record in records]):
        document = head + text_ids + [eos_id]
        num_tokens += len(document)
        examples.extend({"input_ids": document[start:start + max_length]}
                        for start in range(0, len(document), max_length))
    report = TruncationReport("pretrain", max_length, num_records=len(records),
                              num_tokens=num_tokens, num_chunks=len(examples))
    report.log()
    return examples, report


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kinds.
# ---------------------------------------------------------------------------------------------

def _check_lengths(max_length: int, min_prompt_tokens: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if min_prompt_tokens < 1:
        raise ValueError(f"min_prompt_tokens must be at least 1, got {min_prompt_tokens}")


def _fit_prompt(
    prompt_ids: list[int], other_tokens: int, max_length: int, min_prompt_tokens: int,
    report: TruncationReport, source: str,
) -> list[int] | None:
    """The prompt's ids cut from the left so that `other_tokens` more fit in max_length, or None to drop."""
    budget = max_length - other_tokens
    if len(prompt_ids) <= budget:
        return prompt_ids
    if budget < min(min_prompt_tokens, len(prompt_ids)):
        report.dropped_too_long += 1
        logger.debug("%s: dropped, its answer needs %d of max_length=%d tokens", source, other_tokens, max_length)
        return None
    report.truncated_prompts += 1
    return prompt_ids[len(prompt_ids) - budget:]


def _source(record: dict) -> str:
    # records from load_records always have one; hand-built ones (tests, scripts) may not
    return record.get("source", "(record without a source)")


class _Encoded(NamedTuple):
    head: list[int]  # kept whole by truncation: the tokenizer's BOS (or a BOS the chat template wrote)
    prompt_ids: list[int]
    answers_ids: list[list[int]]  # one per answer, each ending with exactly one EOS
    prompt_text: str  # as tokenised (rendered by the chat template where one was used)


def resolve_chat_template(setting: bool | str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """`use_chat_template` ("auto" | True | False) -> whether plain records are rendered by the template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has_template
    if setting is True and not has_template:
        raise DataError("data.use_chat_template=true but the tokenizer has no chat_template; set it to auto or "
                        "false, or give the tokenizer a chat template")
    if not isinstance(setting, bool):
        raise ValueError(f"use_chat_template must be 'auto', true or false, got {setting!r}")
    return setting


def _encode(
    records: list[dict], answers_of: list[list[str]], tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool | str,
) -> list[_Encoded]:
    """Each record's prompt and answers as ids, tokenised in two batched calls."""
    use_chat_template = resolve_chat_template(use_chat_template, tokenizer)
    plain_head = _special_prefix(tokenizer)
    eos_id = _eos_id(tokenizer)
    prompt_texts, answer_texts, rendered = [], [], []
    for record, answers in zip(records, answers_of):
        prompt_text, record_answer_texts, is_rendered = _texts(record, answers, tokenizer, use_chat_template)
        prompt_texts.append(prompt_text)
        answer_texts.append(record_answer_texts)
        rendered.append(is_rendered)

    prompts_ids = _encode_texts(tokenizer, prompt_texts)
    flat_answers_ids = iter(_encode_texts(tokenizer, [text for texts in answer_texts for text in texts]))
    encoded = []
    for prompt_text, prompt_ids, texts, is_rendered in zip(prompt_texts, prompts_ids, answer_texts, rendered):
        if is_rendered:
            # The template wrote its own special tokens (texts are encoded without the tokenizer's). Its
            # leading BOS, if it is the one the tokenizer adds, is kept out of truncation's reach; a
            # ChatML `<|im_start|>` that a tokenizer merely names as its BOS (SmolLM2) is prompt text.
            has_head = bool(plain_head) and prompt_ids[:len(plain_head)] == plain_head
            head, prompt_ids = (plain_head, prompt_ids[len(plain_head):]) if has_head else ([], prompt_ids)
        else:
            head = plain_head
        answers_ids = [_end_with_one_eos(next(flat_answers_ids), eos_id, tokenizer if is_rendered else None)
                       for _ in texts]
        encoded.append(_Encoded(head, prompt_ids, answers_ids, prompt_text))
    return encoded


def _end_with_one_eos(answer_ids: list[int], eos_id: int, template_tokenizer=None) -> list[int]:
    """The answer ending with exactly one EOS, where the sampler would stop.

    A rendered answer (`template_tokenizer` given) whose template ends the turn with the EOS, followed
    only by whitespace (ChatML's "<|im_end|>\n"), ends at that EOS. Any other answer gets EOS appended
    unless it already ends with one.
    """
    if template_tokenizer is not None and eos_id in answer_ids:
        last_eos = len(answer_ids) - 1 - answer_ids[::-1].index(eos_id)
        if not template_tokenizer.decode(answer_ids[last_eos + 1:]).strip():
            return answer_ids[:last_eos + 1]
    return answer_ids if answer_ids[-1:] == [eos_id] else answer_ids + [eos_id]


def _texts(
    record: dict, answers: list[str], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool,
) -> tuple[str, list[str], bool]:
    """(prompt text, answer texts, whether the chat template rendered them) for one record."""
    if "messages" in record:
        prompt_messages = record["messages"][:-1]
    elif use_chat_template:
        prompt_messages = [{"role": "user", "content": record["prompt"]}]
    else:
        return record["prompt"], list(answers), False

    prompt_text = _render(tokenizer, prompt_messages, _source(record), add_generation_prompt=True)
    answer_texts = []
    for answer in answers:
        conversation = prompt_messages + [{"role": "assistant", "content": answer}]
        full_text = _render(tokenizer, conversation, _source(record), add_generation_prompt=False)
        # The answer is what the full conversation adds to the prompt; that needs the prompt as a prefix.
        if not full_text.startswith(prompt_text):
            raise ModelError(
                f"{_source(record)}: the tokenizer's chat template renders the prompt (with the generation "
                "prompt) differently from the start of prompt + answer, so the answer cannot be located; "
                "use a template where one is a prefix of the other, or plain prompt/completion records"
            )
        answer_texts.append(full_text[len(prompt_text):])
    return prompt_text, answer_texts, True


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], source: str, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: a chat-formatted record needs the tokenizer's chat_template, and this tokenizer has "
            "none; set tokenizer.chat_template, or write the record as prompt/completion"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # One batched call: fast tokenizers encode a list in Rust, many times quicker than a Python loop.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before any text with add_special_tokens=True (e.g. [BOS], or [])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no eos_token: answers end with EOS so the model learns to stop; "
                         "set tokenizer.eos_token")
    return tokenizer.eos_token_id

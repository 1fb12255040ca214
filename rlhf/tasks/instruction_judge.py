"""The instruction task's gold judge: scores any answer to one of its prompts, and ranks K answers.

Each prompt (see `rlhf.tasks.instructions`) asks for something with a checkable content and a checkable
form. The judge grades the two separately, then combines them so that content dominates:

    content  in [0, 1]   is the answer right?
        add        closeness of the first integer to the sum: max(0, 1 - |n - sum| / 10), after
                   any restatement of the question ("17 + 25 = 42" reads 42)
        sort       fraction of positions holding the right number (over the expected count)
        list       distinct items that belong to the category, over the count asked for (at most 1);
                   items are read at commas, line breaks and 'and', numbering and bullets dropped
        lowercase  as list
        capital    1 when the country's capital is named, else 0
        uppercase  1 when the word is given (in any case), else 0
    form     in [0, 1]   does it follow the instruction's format?
        add        the answer is one integer alone (a final "." allowed)
        sort       the answer is comma-separated numbers only, as many as given
        list       mean of: one line of exactly N comma-separated items; each item at most 3 words
        lowercase  mean of: one line of exactly N comma-separated items; no upper-case letter anywhere
        capital    the answer is one word (a final "." allowed)
        uppercase  the answer is one word in capital letters alone (a final "." allowed)
    score    = content * (0.5 + 0.5 * form)                 in [0, 1]

So a right answer in the wrong form keeps half its worth, and a wrong or empty answer scores 0
however well formed or short it is: length alone cannot win. Scores are rounded to 6 decimals so
that equally good answers tie exactly; `rank` breaks ties by input order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf.errors import DataError
from rlhf.tasks.instruction_vocab import CAPITALS, CATEGORIES, singular

CONTENT_FLOOR = 0.5  # ours: a right answer in the wrong form keeps half its score
NUMBER_TOLERANCE = 10  # ours: a sum off by 1 keeps 0.9 of the content, off by 10 keeps none
MAX_ITEM_WORDS = 3  # ours: "sea lion" or "united states" are items; "apple is a fruit" is prose

_INT = re.compile(r"-?\d+")
_FINAL_STOP = re.compile(r"[.!]\s*$")


@dataclass(frozen=True)
class Judgement:
    """The gold judge's view of one answer."""

    kind: str  # the prompt's kind: add, sort, list, lowercase, capital, uppercase
    content: float  # in [0, 1]
    form: float  # in [0, 1]
    score: float  # content * (0.5 + 0.5 * form), rounded to 6 decimals


@dataclass(frozen=True)
class Request:
    """What a prompt asks for, read back from its text."""

    kind: str
    numbers: tuple[int, ...] = ()  # add: the two operands; sort: the numbers to sort
    count: int = 0  # list, lowercase: how many items
    category: str = ""  # list, lowercase: a key of CATEGORIES
    word: str = ""  # capital: the country; uppercase: the word


# One pattern per kind, matched anywhere in the prompt (a user's opener may come first).
_PATTERNS = {
    "add": re.compile(r"What is (\d+) \+ (\d+)\? Answer with the number only\."),
    "sort": re.compile(r"Sort these numbers from smallest to largest: ([\d, ]+)\. "
                       r"Reply with the numbers only, separated by commas\."),
    "list": re.compile(r"List (\d+) (\w+), separated by commas\. Reply with the list only\."),
    "lowercase": re.compile(r"Name (\d+) (\w+) in lowercase letters only, separated by commas\."),
    "capital": re.compile(r"What is the capital of ([\w ]+)\? Answer with one word\."),
    "uppercase": re.compile(r"Write the word '(\w+)' in capital letters only\."),
}


def parse_request(prompt: str) -> Request:
    """The request in `prompt`; DataError when it is none of the task's prompts."""
    for kind, pattern in _PATTERNS.items():
        found = pattern.search(prompt)
        if not found:
            continue
        if kind == "add":
            return Request(kind, numbers=(int(found[1]), int(found[2])))
        if kind == "sort":
            return Request(kind, numbers=tuple(int(n) for n in _INT.findall(found[1])))
        if kind in ("list", "lowercase"):
            if found[2] not in CATEGORIES:
                break
            return Request(kind, count=int(found[1]), category=found[2])
        return Request(kind, word=found[1])
    raise DataError(f"the instructions gold judge cannot grade prompt {prompt[:80]!r}: it is not one of the "
                    "instruction task's (rlhf instructions); use the judge of your data's task (--gold)")


def _items(answer: str) -> list[str]:
    """The answer's items, normalised: split at commas, line breaks and 'and', without list numbering or bullets,
    lower case, no final stop, no 'a '/'the ' in front ("1. Dog\n2. Cat" names dog and cat)."""
    items = []
    for raw in re.split(r",|\n|\band\b", _FINAL_STOP.sub("", answer.strip())):
        item = re.sub(r"^\s*(\d+[.)]|[-*\u2022])\s*", "", raw).strip().lower()
        item = re.sub(r"^(a|an|the)\s+", "", item).strip(" .!")
        if item:
            items.append(item)
    return items


def _alone(answer: str) -> str:
    """The answer without surrounding space and one final '.' or '!'."""
    return _FINAL_STOP.sub("", answer.strip())


def _grade(request: Request, answer: str) -> tuple[float, float]:
    """(content, form) of `answer` to `request`, both in [0, 1]."""
    alone = _alone(answer)
    if request.kind == "add":
        target = sum(request.numbers)
        a, b = request.numbers
        numbers = _INT.findall(re.sub(rf"\b{a}\s*\+\s*{b}\s*(=|is)", "", answer))  # skip "17 + 25 = 42"'s restatement
        content = max(0.0, 1.0 - abs(int(numbers[0]) - target) / NUMBER_TOLERANCE) if numbers else 0.0
        return content, float(_INT.fullmatch(alone) is not None)
    if request.kind == "sort":
        target = sorted(request.numbers)
        got = [int(n) for n in _INT.findall(answer)]
        content = sum(a == b for a, b in zip(got, target)) / len(target)
        only_numbers = re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", alone) is not None
        return content, float(only_numbers and len(got) == len(target))
    if request.kind in ("list", "lowercase"):
        vocabulary = CATEGORIES[request.category]
        items = _items(answer)
        distinct_in_category = {singular(item, vocabulary) for item in items} & vocabulary
        content = min(1.0, len(distinct_in_category) / request.count)
        # the form asks for one line of exactly N comma-separated items
        right_count = float("\n" not in answer.strip() and len(items) == request.count)
        if request.kind == "list":
            short_items = float(bool(items) and all(len(item.split()) <= MAX_ITEM_WORDS for item in items))
            return content, (right_count + short_items) / 2
        return content, (right_count + float(answer == answer.lower())) / 2
    if request.kind == "capital":
        capital = CAPITALS[request.word].lower()
        content = float(re.search(rf"\b{re.escape(capital)}\b", answer.lower()) is not None)
        return content, float(len(alone.split()) == 1)
    # uppercase
    content = float(re.search(rf"\b{re.escape(request.word.lower())}\b", answer.lower()) is not None)
    return content, float(re.fullmatch(r"[A-Z]+", alone) is not None)


def judge(prompt: str, answer: str) -> Judgement:
    """Grade `answer` to the task's `prompt` (see the module docstring for the rule)."""
    request = parse_request(prompt)
    content, form = _grade(request, answer)
    score = content * (CONTENT_FLOOR + (1.0 - CONTENT_FLOOR) * form)
    return Judgement(request.kind, content, form, round(score, 6))


def gold_score(prompt: str, answer: str) -> float:
    """The gold score of `answer` to `prompt`, in [0, 1]."""
    return judge(prompt, answer).score


def rank(prompt: str, answers: list[str]) -> list[int]:
    """Indices of `answers`, best first by gold score; equal scores keep their input order."""
    scores = [gold_score(prompt, answer) for answer in answers]
    return sorted(range(len(answers)), key=lambda i: (-scores[i], i))

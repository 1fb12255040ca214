"""The toy world's vocabulary, its five tasks and the one surface form every prompt takes.

A prompt is `[opener] TASK : ARGS =`, whitespace-separated, e.g. `please sort : c a e b =`; the
answer is the tokens after `=` (`a b c e`). Five tasks, two kinds of answer:

    sort    : c a e b =   ->  a b c e        (letters, sorted)
    reverse : c a e b =   ->  b e a c        (letters, reversed)
    copy    : c a e b =   ->  c a e b        (letters, unchanged)
    upper   : c a e b =   ->  C A E B        (letters, upper-cased)
    add     : 3 5 =       ->  8              (one number)

The pretraining corpus states the same facts in another surface form (`sorted c a e b is a b c e .`,
`3 plus 5 is 8 .`), so the base model knows them but not the instruction format.
"""

import re
from dataclasses import dataclass
from typing import Callable

from rlhf.errors import DataError

LETTERS = tuple("abcdefgh")
UPPER_LETTERS = tuple(letter.upper() for letter in LETTERS)
MAX_OPERAND = 12  # ours: operands 0..12 give 169 addition facts, few enough for a tiny model
NUMBERS = tuple(str(n) for n in range(2 * MAX_OPERAND + 1))  # one token per number 0..24
OPENERS = ("please", "hey", "now", "quick")  # a user's habitual first word (or none)
# What a sloppy writer appends after the answer; every phrase is also free text in the corpus.
FILLERS = ("ok", "done", "ok done", "sure", "thanks", "hope this helps", "here you go", "all done",
           "that is it", "sure thing ok")
PROMPT_SEP, PROMPT_END, FULL_STOP = ":", "=", "."


@dataclass(frozen=True)
class Task:
    """One instruction type: its prompt word, its pretraining-statement word and its solver."""

    name: str  # the instruction word in prompts: "sort : c a b ="
    statement_word: str  # the word of the pretraining statements: "sorted c a b is a b c ."
    numeric: bool  # True: the answer is one number token; False: a sequence of letter tokens
    solve: Callable[[list[str]], list[str]]


def _add(args: list[str]) -> list[str]:
    return [str(int(args[0]) + int(args[1]))]


TASKS = (
    Task("sort", "sorted", False, lambda args: sorted(args)),
    Task("reverse", "reversed", False, lambda args: args[::-1]),
    Task("copy", "copied", False, lambda args: list(args)),
    Task("upper", "upper", False, lambda args: [letter.upper() for letter in args]),
    Task("add", "plus", True, _add),
)
TASKS_BY_NAME = {task.name: task for task in TASKS}

# Words of the corpus's free text ("c comes before d .", "after 4 comes 5 .", "7 is more than 3 .").
FREE_TEXT_WORDS = ("is", "comes", "before", "after", "more", "less", "than", "twice")


def vocabulary() -> list[str]:
    """Every word of the world, in a fixed order (special tokens are the tokenizer's business)."""
    words = [*LETTERS, *UPPER_LETTERS, *NUMBERS, PROMPT_SEP, PROMPT_END, FULL_STOP, *OPENERS]
    words += [task.name for task in TASKS] + [task.statement_word for task in TASKS]
    words += FREE_TEXT_WORDS
    words += [word for phrase in FILLERS for word in phrase.split()]
    return list(dict.fromkeys(words))  # de-duplicated, first occurrence wins: deterministic order


def format_prompt(task: Task, args: list[str], opener: str | None = None) -> str:
    """`[opener] TASK : ARGS =`, the one surface form of every prompt."""
    head = [opener] if opener else []
    return " ".join([*head, task.name, PROMPT_SEP, *args, PROMPT_END])


# A special token such as <eos> is one word; otherwise the tokenizer's own pre-tokenizer rule
# (`tokenizers.pre_tokenizers.Whitespace`: runs of word characters, or runs of punctuation).
_WORD_RE = re.compile(r"<\w+>|\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    """Text -> the world's tokens, ignoring how whitespace was laid out ("a  b." -> [a, b, .])."""
    return _WORD_RE.findall(text)


def parse_prompt(prompt: str) -> tuple[Task, list[str]]:
    """Inverse of `format_prompt`: (task, args). Raises `DataError` for text that is not a toy prompt."""
    words = [word for word in split_words(prompt) if word not in ("<bos>", "<pad>")]
    if words and words[0] in OPENERS:
        words = words[1:]
    if len(words) < 4 or words[1] != PROMPT_SEP or words[-1] != PROMPT_END or words[0] not in TASKS_BY_NAME:
        raise DataError(
            f"not a toy-world prompt: {prompt!r}; expected '[opener] TASK : ARGS =' with TASK in "
            f"{sorted(TASKS_BY_NAME)}"
        )
    task, args = TASKS_BY_NAME[words[0]], words[2:-1]
    valid = (len(args) == 2 and all(arg.isdigit() for arg in args)) if task.numeric else (
        all(arg in LETTERS for arg in args))
    if not valid:
        kind = "two numbers" if task.numeric else f"letters from {''.join(LETTERS)}"
        raise DataError(f"toy prompt {prompt!r}: task {task.name!r} takes {kind}, got {args}")
    return task, args


def target_answer(prompt: str) -> list[str]:
    """The best answer's tokens for a toy prompt."""
    task, args = parse_prompt(prompt)
    return task.solve(args)

"""The toy world's gold labeller: scores any answer and ranks K answers, as InstructGPT labellers do.

Scoring rule, for an answer read as the world's tokens (whitespace is normalised; text after the
first `<eos>` and any `<bos>`/`<pad>` are ignored) against the target answer of the prompt:

    correctness  in [0, 1]
        letter tasks: the fraction of target positions the answer gets right, position by position
                      over the first len(target) tokens (a missing token counts as wrong);
        add:          closeness of the first token to the sum, max(0, 1 - |n - sum| / 4)
                      (0 when it is not a number).
    extra        = tokens beyond the target's length (filler such as "ok done", a trailing ".", or
                   whatever a model emits instead of stopping)
    conciseness  = 1 / (1 + 0.5 * extra)           in (0, 1]; 1 means "the answer alone, then stop"
    gold_score   = correctness * (0.6 + 0.4 * conciseness)     in [0, 1]

So correct+concise (1.0) > correct+sloppy ("a b c ok done": 0.8) > wrong, and brevity earns
nothing on its own: an empty or wrong answer scores 0 however short it is. Scores are rounded to
6 decimals so that answers which are equally good tie exactly; `rank` breaks ties by input order.
"""

from dataclasses import dataclass

from rlhf.toy.tasks import parse_prompt, split_words

CORRECTNESS_WEIGHT = 0.6  # ours: a correct answer keeps at least 0.6 however sloppy it is
CONCISENESS_WEIGHT = 1.0 - CORRECTNESS_WEIGHT
EXTRA_TOKEN_COST = 0.5  # ours: one filler token costs 1/3 of conciseness, two cost 1/2
NUMBER_TOLERANCE = 4  # ours: an off-by-one sum keeps 3/4 of the correctness, off by 4 keeps none


@dataclass(frozen=True)
class Judgement:
    """The gold labeller's view of one answer: the two qualities and the score they make."""

    correctness: float  # in [0, 1]
    conciseness: float  # in (0, 1]
    extra_tokens: int  # tokens beyond the target's length
    score: float  # correctness * (0.6 + 0.4 * conciseness), rounded to 6 decimals


def answer_words(answer: str) -> list[str]:
    """The answer's tokens as the labeller reads them: up to the first <eos>, without <bos>/<pad>."""
    words = []
    for word in split_words(answer):
        if word == "<eos>":
            break
        if word not in ("<bos>", "<pad>"):
            words.append(word)
    return words


def judge(prompt: str, answer: str) -> Judgement:
    """Score `answer` to the toy `prompt` (see the module docstring for the rule)."""
    task, args = parse_prompt(prompt)
    target = task.solve(args)
    words = answer_words(answer)
    if task.numeric:
        correctness = 0.0
        if words and words[0].isdigit():
            correctness = max(0.0, 1.0 - abs(int(words[0]) - int(target[0])) / NUMBER_TOLERANCE)
    else:
        correctness = sum(got == want for got, want in zip(words, target)) / len(target)
    extra_tokens = max(0, len(words) - len(target))
    conciseness = 1.0 / (1.0 + EXTRA_TOKEN_COST * extra_tokens)
    score = correctness * (CORRECTNESS_WEIGHT + CONCISENESS_WEIGHT * conciseness)
    return Judgement(correctness, conciseness, extra_tokens, round(score, 6))


def gold_score(prompt: str, answer: str) -> float:
    """The gold score of `answer` to the toy `prompt`, in [0, 1] (1 = the target answer alone)."""
    return judge(prompt, answer).score


def rank(prompt: str, answers: list[str]) -> list[int]:
    """Indices of `answers`, best first by gold score; equal scores keep their input order."""
    scores = [gold_score(prompt, answer) for answer in answers]
    return sorted(range(len(answers)), key=lambda i: (-scores[i], i))

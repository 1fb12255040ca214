"""The toy world's gold labeller: scores any answer and ranks K answers, as InstructGPT labellers do.

Scoring rule, for an answer read as the world's tokens (whitespace is normalised; text after the
first `<eos>` and any `<bos>`/`<pad>` are ignored) against the target answer of the prompt:

    correctness  in [0, 1]
        letter tasks: the fraction of target positions the answer gets right, position by position
                      over the first len(target) tokens (a missing token counts as wrong);
        add:          closeness of the first token to the sum, max(0, 1 - |n - sum| / 4)
                      (0 when it is not a number).
    content      = 0.5 * correctness + 0.5 * [correctness == 1]     a fully correct answer is worth
                   twice a nearly correct one: getting it right is what the task is about
    extra        = tokens beyond the target's length
    length       = 1 while extra <= 2 (the answer, then "." and a word, or any two tokens: neutral),
                   then 1 / (1 + 0.25 * (extra - 2)): rambling, or never stopping, costs
    gold_score   = content * length                                  in [0, 1]

Length alone cannot win: a short answer scores only for what it gets right (an empty or wrong answer
scores 0 however short), and within the band of 2 extra tokens length changes nothing, so a policy
(or a reward model) that only learns "stop early" gains nothing on the answers SFT already ends
properly. Scores are rounded to 6 decimals so that answers which are equally good tie exactly; `rank`
breaks ties by input order.
"""

from dataclasses import dataclass

from rlhf.toy.tasks import parse_prompt, split_words

FULLY_CORRECT_BONUS = 0.5  # ours: half the content score is for getting the whole answer right
FREE_EXTRA_TOKENS = 2  # ours: "a b c ." and "a b c . ok" are as good as "a b c"
EXTRA_TOKEN_COST = 0.25  # ours: past the band, 4 more tokens halve the score
NUMBER_TOLERANCE = 4  # ours: an off-by-one sum keeps 3/4 of the correctness, off by 4 keeps none


@dataclass(frozen=True)
class Judgement:
    """The gold labeller's view of one answer: the two qualities and the score they make."""

    correctness: float  # in [0, 1]
    conciseness: float  # the length factor in (0, 1]; 1 within the band of FREE_EXTRA_TOKENS
    extra_tokens: int  # tokens beyond the target's length
    score: float  # (0.5 * correctness + 0.5 * fully correct) * conciseness, rounded to 6 decimals


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
    conciseness = 1.0 / (1.0 + EXTRA_TOKEN_COST * max(0, extra_tokens - FREE_EXTRA_TOKENS))
    content = (1.0 - FULLY_CORRECT_BONUS) * correctness + FULLY_CORRECT_BONUS * (correctness == 1.0)
    score = content * conciseness
    return Judgement(correctness, conciseness, extra_tokens, round(score, 6))


def gold_score(prompt: str, answer: str) -> float:
    """The gold score of `answer` to the toy `prompt`, in [0, 1] (1 = the target answer alone)."""
    return judge(prompt, answer).score


def rank(prompt: str, answers: list[str]) -> list[int]:
    """Indices of `answers`, best first by gold score; equal scores keep their input order."""
    scores = [gold_score(prompt, answer) for answer in answers]
    return sorted(range(len(answers)), key=lambda i: (-scores[i], i))

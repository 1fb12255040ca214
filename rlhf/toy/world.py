"""The toy world: a tiny instruction-following task where each InstructGPT stage has something to add.

The world (see `rlhf.toy.tasks`): five tasks over 8 letters and the numbers 0..24, asked as prompts
of one surface form, `[opener] TASK : ARGS =` -> answer, e.g. `please sort : c a e b =` -> `a b c e`,
`add : 3 5 =` -> `8`. Simulated users ask them: each user has a favourite task, a favourite subset of
letters, a habitual length and operand range and a habitual opener ("please", "hey", ...), so one
user's prompts resemble each other and train/validation must be split by user id, as in the paper.

The gold labeller (`rlhf.toy.labeller`) scores any answer in [0, 1]: graded correctness (fraction of
positions right, or closeness of a sum) times a format factor that rewards the answer alone,
stopping at once. It ranks K answers by that score.

Why each stage has something to add:
- Pretraining (`pretrain.jsonl`, plain text): the base model learns the facts in another surface
  form (`sorted c a e b is a b c e .`, `3 plus 5 is 8 .`) plus free text and chatter
  (`hope this helps .`), but never sees a prompt: it knows the world, not the instruction format.
- SFT (`sft.jsonl`): demonstrations teach the format, but like human ones they are imperfect: by
  default 20% are slightly wrong (a swapped, dropped or substituted letter, a sum off by one) and
  60% are sloppy: a trailing "." and, half of those, filler after it ("a b c e . ok done"). An SFT
  model imitating them inherits both (even greedy decoding keeps the "."); the demonstrations
  average a gold score of about 0.8, the target answers 1.0.
- RM (`rankings.jsonl`): K = 4..9 candidate answers per prompt (correct or wrong by 1-3 errors;
  concise, or trailing ".", filler or both) ranked by the labeller. Ranking shows what the
  demonstrations show only inconsistently: concise beats sloppy, and more correct beats less.
- PPO (`prompts.jsonl`, prompts only): the RM rewards answers that stop right after the answer;
  the cheapest improvement for a tiny policy is to emit <eos> instead of "." or filler, which the
  gold labeller sees at once (correctness has headroom too: sampled SFT answers err more).
  PPO-ptx (`pretrain.jsonl` again) keeps the base's statement form from decaying meanwhile.

Records (JSONL, one object per line): sft `{"prompt", "completion", "user_id"}`, rankings
`{"prompt", "responses": [best, ..., worst], "user_id"}`, prompts `{"prompt", "user_id"}`, pretrain
`{"text"}`. Everything comes from `random.Random` seeded with strings derived from the seed, so
the same seed gives the same files on any machine.
"""

import random
from dataclasses import dataclass

from rlhf.toy.config import ToyConfig
from rlhf.toy.labeller import gold_score, rank
from rlhf.toy.tasks import (
    FILLERS,
    FULL_STOP,
    LETTERS,
    MAX_OPERAND,
    OPENERS,
    TASKS,
    Task,
    format_prompt,
)

# ours: the shares below shape the corpus; statements dominate so the base knows the facts.
PRETRAIN_MIX = {"statement": 0.7, "order_fact": 0.15, "chatter": 0.15}
STATEMENT_THEN_CHATTER = 0.2  # ours: some statements trail chatter, so filler is a natural habit
FAVOURITE_TASK_WEIGHT = 0.6  # ours: a user's favourite task takes 60% of their prompts
FAVOURITE_LETTERS_SHARE = 0.85  # ours: the rest of the time a user draws from all 8 letters
LENGTH_RANGES = ((2, 4), (3, 5), (4, 5))  # ours: a user's habitual number of letters per prompt
SLOPPY_FILLER_SHARE = 0.5  # ours: half the sloppy demonstrations add filler after the "."


@dataclass(frozen=True)
class User:
    """A simulated user; its habits make its prompts alike (why splits go by user id)."""

    user_id: str
    favourite_task: str
    letters: tuple[str, ...]  # the 6 letters this user mostly asks about
    length_range: tuple[int, int]  # inclusive bounds on the letters per prompt
    max_operand: int  # this user's largest addend
    opener: str | None  # the word this user starts prompts with, or None

    def ask(self, rng: random.Random) -> tuple[Task, list[str]]:
        """One (task, args) in this user's habits."""
        weights = [FAVOURITE_TASK_WEIGHT if task.name == self.favourite_task
                   else (1 - FAVOURITE_TASK_WEIGHT) / (len(TASKS) - 1) for task in TASKS]
        task = rng.choices(TASKS, weights)[0]
        if task.numeric:
            return task, [str(rng.randint(0, self.max_operand)) for _ in range(2)]
        pool = self.letters if rng.random() < FAVOURITE_LETTERS_SHARE else LETTERS
        return task, rng.sample(pool, rng.randint(*self.length_range))


def make_users(n_users: int, seed: int) -> list[User]:
    rng = random.Random(f"toy:{seed}:users")
    users = []
    for i in range(n_users):
        users.append(User(
            user_id=f"user_{i:03d}",
            favourite_task=rng.choice(TASKS).name,
            letters=tuple(sorted(rng.sample(LETTERS, 6))),
            length_range=rng.choice(LENGTH_RANGES),
            max_operand=rng.randint(MAX_OPERAND // 2, MAX_OPERAND),
            opener=rng.choice((None, *OPENERS)),
        ))
    return users


def corrupt(task: Task, answer: list[str], rng: random.Random, n_errors: int = 1,
            kinds: tuple[str, ...] = ("swap", "substitute", "drop")) -> list[str]:
    """`answer` with `n_errors` plausible mistakes of `kinds` (always different from `answer`).

    A sum is off by `n_errors`; a letter answer gets letters swapped, substituted or dropped.
    """
    if task.numeric:
        offset = rng.choice([-1, 1]) * n_errors
        wrong = int(answer[0]) + offset
        return [str(wrong if wrong >= 0 else int(answer[0]) + n_errors)]
    wrong = list(answer)
    alphabet = [letter.upper() for letter in LETTERS] if answer[0].isupper() else list(LETTERS)
    for _ in range(n_errors):
        kind = rng.choice(kinds) if len(wrong) > 1 else "substitute"
        if kind == "swap":
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        elif kind == "drop":
            wrong.pop(rng.randrange(len(wrong)))
        if kind == "substitute" or wrong == answer:  # a second swap can undo the first
            i = rng.randrange(len(wrong))
            wrong[i] = rng.choice([letter for letter in alphabet if letter != wrong[i]])
    return wrong


def filler(rng: random.Random, n_tokens: int | None = None) -> list[str]:
    """A filler phrase ("ok done"); with `n_tokens`, phrases joined and cut to exactly that many."""
    words = rng.choice(FILLERS).split()
    while n_tokens is not None and len(words) < n_tokens:
        words += rng.choice(FILLERS).split()
    return words if n_tokens is None else words[:n_tokens]


def demonstration(task: Task, args: list[str], rng: random.Random, cfg: ToyConfig) -> str:
    """A labeller-written answer: right most of the time, sometimes slightly wrong, often sloppy.

    Sloppy means a trailing "." (the habit of the corpus's statements) and, half the time, filler
    after it ("a b c . ok done"). With sloppy_rate > 0.5 an SFT model's most likely next token after
    the answer is ".", so even its greedy answers carry it; only preference learning removes it.
    """
    answer = task.solve(args)
    if rng.random() < cfg.demo_wrong_rate:
        answer = corrupt(task, answer, rng)
    if rng.random() < cfg.demo_sloppy_rate:
        answer = answer + [FULL_STOP] + (filler(rng) if rng.random() < SLOPPY_FILLER_SHARE else [])
    return " ".join(answer)


def candidate_answers(task: Task, args: list[str], rng: random.Random) -> list[str]:
    """A varied pool of distinct answers to rank: {correct, 1-3 errors} x {concise, sloppy tails}.

    The cores always include one with a single substituted letter, so even a 2-letter prompt has
    three correctness levels (1, 0.5, 0) and, with tails of 0..7 extra tokens (six length factors:
    0..2 extra tokens are one), at least 13 distinct scores (all fully wrong answers score 0).
    """
    target = task.solve(args)
    cores = [target, corrupt(task, target, rng, 1, kinds=("substitute",))]
    cores += [corrupt(task, target, rng, n_errors) for n_errors in (1, 2, 3)]
    tails = [[], [FULL_STOP]] + [[FULL_STOP, *filler(rng, n_tokens)] for n_tokens in (1, 2, 3, 4, 5, 6)]
    tails += [filler(rng, n_tokens) for n_tokens in (1, 2)]
    pool = [" ".join(core + tail) for core in cores for tail in tails]
    return list(dict.fromkeys(pool))


def ranking(prompt: str, task: Task, args: list[str], k: int, rng: random.Random) -> list[str]:
    """K candidate answers with distinct gold scores, ranked best first by the gold labeller."""
    pool = candidate_answers(task, args, rng)
    rng.shuffle(pool)
    chosen, scores = [], set()
    for answer in pool:  # distinct scores: a tie would be a pair the labeller cannot order
        score = gold_score(prompt, answer)
        if score not in scores:
            chosen.append(answer)
            scores.add(score)
        if len(chosen) == k:
            break
    assert len(chosen) == k, f"only {len(chosen)} distinct scores for {prompt!r}; need {k}"
    return [chosen[i] for i in rank(prompt, chosen)]


def pretrain_text(rng: random.Random) -> str:
    """One line of plain text from the world: a statement, an order fact or chatter."""
    kind = rng.choices(list(PRETRAIN_MIX), list(PRETRAIN_MIX.values()))[0]
    if kind == "chatter":
        return " ".join(filler(rng) + [FULL_STOP])
    if kind == "order_fact":
        if rng.random() < 0.5:
            i = rng.randrange(len(LETTERS) - 1)
            j = rng.randrange(i + 1, len(LETTERS))
            return f"{LETTERS[i]} comes before {LETTERS[j]} ."
        n, m = rng.randint(0, 2 * MAX_OPERAND - 1), rng.randint(0, 2 * MAX_OPERAND)
        if m == n:
            return f"after {n} comes {n + 1} ."
        return f"{max(n, m)} is more than {min(n, m)} ." if rng.random() < 0.5 else (
            f"{min(n, m)} is less than {max(n, m)} .")
    task = rng.choice(TASKS)
    if task.numeric:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        statement = [str(a), task.statement_word, str(b), "is", str(a + b), FULL_STOP]
    else:
        args = rng.sample(LETTERS, rng.randint(2, 6))
        statement = [task.statement_word, *args, "is", *task.solve(args), FULL_STOP]
    if rng.random() < STATEMENT_THEN_CHATTER:
        statement += filler(rng) + [FULL_STOP]
    return " ".join(statement)


def make_records(cfg: ToyConfig) -> dict[str, list[dict]]:
    """The four record sets {"sft", "rankings", "prompts", "pretrain"}, each from its own prompt draw."""
    users = make_users(cfg.n_users, cfg.seed)

    def draws(name: str, n: int):
        rng = random.Random(f"toy:{cfg.seed}:{name}")  # one stream per set: sizes don't shift others
        for _ in range(n):
            user = rng.choice(users)
            task, args = user.ask(rng)
            yield rng, user, task, args, format_prompt(task, args, opener=user.opener)

    sft = [{"prompt": prompt, "completion": demonstration(task, args, rng, cfg), "user_id": user.user_id}
           for rng, user, task, args, prompt in draws("sft", cfg.n_sft_prompts)]
    rankings = [{"prompt": prompt, "responses": ranking(prompt, task, args, rng.randint(cfg.min_k, cfg.max_k), rng),
                 "user_id": user.user_id}
                for rng, user, task, args, prompt in draws("rm", cfg.n_rm_prompts)]
    prompts = [{"prompt": prompt, "user_id": user.user_id}
               for _, user, _, _, prompt in draws("rl", cfg.n_rl_prompts)]
    pretrain_rng = random.Random(f"toy:{cfg.seed}:pretrain")
    pretrain = [{"text": pretrain_text(pretrain_rng)} for _ in range(cfg.n_pretrain_texts)]
    return {"sft": sft, "rankings": rankings, "prompts": prompts, "pretrain": pretrain}

"""A real instruction task for pretrained instruct models, with a program as the gold judge.

Six kinds of request, each with a checkable content and a checkable form (graded by
`rlhf.tasks.instruction_judge`):

    add        What is 17 + 25? Answer with the number only.                              -> 42
    sort       Sort these numbers from smallest to largest: 42, 7, 19. Reply with the numbers
               only, separated by commas.                                                 -> 7, 19, 42
    list       List 3 fruits, separated by commas. Reply with the list only.             -> apple, pear, fig
    lowercase  Name 4 colors in lowercase letters only, separated by commas.             -> red, blue, ...
    capital    What is the capital of Kenya? Answer with one word.                        -> Nairobi
    uppercase  Write the word 'river' in capital letters only.                            -> RIVER

An instruct model of 135M parameters (SmolLM2-135M-Instruct) gets many right but not all: it adds
two-digit numbers wrongly, pads one-word answers with a sentence, lists the wrong number of items.

Simulated users ask them: each has a favourite kind (60% of their prompts), an opener they put
before the request ("Quick question:"), and a number range, so one user's prompts resemble each
other and every split goes by user id, as InstructGPT's does.

`write_instruction_task(out_dir)` writes a directory laid out like the toy world's, which
`rlhf pipeline --data DIR` reads:

    sft.jsonl       {"prompt", "completion", "user_id"}: demonstrations written by the program; like
                    human ones some are sloppy (right content, chatty form: "The answer is 42.")
    rankings.jsonl  {"prompt", "responses": [best, ..., worst], "user_id"}: program-written candidates
                    ranked by the judge (for rm_labels=file); their prompts are the RM prompts the
                    pipeline's labeller samples the SFT policy on (rm_labels=sampled)
    prompts.jsonl   {"prompt", "user_id"}: RL prompts; the held-out users' ones are the evaluation set
    pretrain.jsonl  {"text"}: plain statements of the same facts, for PPO-ptx and the pretraining loss
    split.json      the users of each part ("train" / "tune" / "test") that every stage reads
    task.json       written last: {"task", "gold", "config", "counts"}; "gold" names the judge that
                    `rlhf pipeline` labels and evaluates with

Every prompt ends with a newline, so a plain prompt + completion join reads "...only.\\n42"; with a
chat template the prompt is the user's message. Everything comes from `random.Random` seeded with
strings derived from the seed: the same seed writes the same files on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError
from rlhf.tasks.instruction_judge import gold_score, parse_request
from rlhf.tasks.instruction_vocab import CAPITALS, CATEGORIES, WORDS

KINDS = ("add", "sort", "list", "lowercase", "capital", "uppercase")
OPENERS = (None, "Quick question:", "Please help.", "Hi!", "I need this for school.")
FAVOURITE_KIND_WEIGHT = 0.6  # ours: a user's favourite kind takes 60% of their prompts
MANIFEST = "task.json"
TUNE_FRACTION = 0.1  # ours: 4 of the default 40 users for choices (learning rate, ptx_coef) and validation
TEST_FRACTION = 0.15  # ours: 6 users (~75 RL prompts) only the reported evaluation sees
RECORD_FILES = {"sft": "sft.jsonl", "rankings": "rankings.jsonl", "prompts": "prompts.jsonl",
                "pretrain": "pretrain.jsonl"}


@dataclass
class InstructionTaskConfig:
    out_dir: str = "runs/instructions/data"  # sft, rankings, prompts and pretrain .jsonl files and task.json
    overwrite: bool = False  # rewrite a task directory written with another config
    seed: int = 0  # ours: the same seed writes byte-identical files
    n_users: int = 40  # ours: a 10-20% user-id split still holds several users
    n_sft: int = 256  # ours: sized with examples/instructions.yaml for a 30-minute CPU pipeline
    n_rm_prompts: int = 96  # ours: RM prompts; the pipeline samples K = 4 answers for each (the CPU-costly part)
    n_rl_prompts: int = 512  # ours: RL prompts; the held-out users' ones are evaluated
    n_pretrain_texts: int = 1000  # ours: plain statements for PPO-ptx and the pretraining loss
    demo_sloppy_rate: float = 0.25  # ours: like human demonstrations, some are right but chatty

    def validate(self) -> None:
        for name in ("n_sft", "n_rm_prompts", "n_rl_prompts", "n_pretrain_texts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.n_users < 2:
            raise ConfigError(f"n_users={self.n_users}: need >= 2 users to split by user id")
        if not 0.0 <= self.demo_sloppy_rate <= 1.0:
            raise ConfigError(f"demo_sloppy_rate={self.demo_sloppy_rate}: must be in [0, 1]")


@dataclass(frozen=True)
class User:
    """A simulated user; their habits make their prompts alike (why splits go by user id)."""

    user_id: str
    favourite_kind: str
    opener: str | None
    max_number: int  # this user's largest operand

    def ask(self, rng: random.Random) -> str:
        weights = [FAVOURITE_KIND_WEIGHT if kind == self.favourite_kind
                   else (1 - FAVOURITE_KIND_WEIGHT) / (len(KINDS) - 1) for kind in KINDS]
        request = make_request(rng.choices(KINDS, weights)[0], rng, self.max_number)
        return f"{self.opener} {request}\n" if self.opener else f"{request}\n"


def make_users(n_users: int, seed: int) -> list[User]:
    rng = random.Random(f"instructions:{seed}:users")
    return [User(f"user_{i:03d}", rng.choice(KINDS), rng.choice(OPENERS), rng.choice((30, 60, 99)))
            for i in range(n_users)]


def make_request(kind: str, rng: random.Random, max_number: int = 99) -> str:
    """The text of one request of `kind` (without opener or newline)."""
    if kind == "add":
        return f"What is {rng.randint(10, max_number)} + {rng.randint(10, max_number)}? Answer with the number only."
    if kind == "sort":
        numbers = ", ".join(str(n) for n in rng.sample(range(1, max_number + 1), rng.randint(3, 5)))
        return (f"Sort these numbers from smallest to largest: {numbers}. "
                "Reply with the numbers only, separated by commas.")
    if kind == "list":
        category = rng.choice(sorted(CATEGORIES))
        return f"List {rng.randint(3, 5)} {category}, separated by commas. Reply with the list only."
    if kind == "lowercase":
        category = rng.choice(sorted(CATEGORIES))
        return f"Name {rng.randint(3, 5)} {category} in lowercase letters only, separated by commas."
    if kind == "capital":
        return f"What is the capital of {rng.choice(sorted(CAPITALS))}? Answer with one word."
    return f"Write the word '{rng.choice(WORDS)}' in capital letters only."


def _items(category: str, count: int, rng: random.Random, title: bool) -> list[str]:
    items = rng.sample(sorted(CATEGORIES[category]), count)
    return [item.title() for item in items] if title else items


def answer(prompt: str, rng: random.Random, sloppy: bool = False, wrong: bool = False) -> str:
    """A program-written answer to `prompt`: right (or `wrong` in content), in the asked form (or `sloppy`)."""
    request = parse_request(prompt)
    kind = request.kind
    if kind == "add":
        total = sum(request.numbers) + (rng.choice((-10, -2, -1, 1, 2, 10)) if wrong else 0)
        return f"The answer is {total}." if sloppy else str(total)
    if kind == "sort":
        numbers = sorted(request.numbers)
        if wrong:
            i = rng.randrange(len(numbers) - 1)
            numbers[i], numbers[i + 1] = numbers[i + 1], numbers[i]
        text = ", ".join(map(str, numbers))
        return f"Here are the numbers in order: {text}." if sloppy else text
    if kind in ("list", "lowercase"):
        title = kind == "list" and request.category == "countries"
        count = request.count + (1 if sloppy and kind == "list" else 0)  # sloppy lists overshoot by one
        items = _items(request.category, count, rng, title)
        if wrong:  # one item from another category
            other = rng.choice(sorted(set(CATEGORIES) - {request.category}))
            items[rng.randrange(len(items))] = _items(other, 1, rng, False)[0]
        if sloppy and kind == "lowercase":
            items = [item.title() for item in items]
        return ", ".join(items)
    if kind == "capital":
        country = rng.choice(sorted(set(CAPITALS) - {request.word})) if wrong else request.word
        return f"The capital of {request.word} is {CAPITALS[country]}." if sloppy else CAPITALS[country]
    word = rng.choice(sorted(set(WORDS) - {request.word})) if wrong else request.word
    return f"Sure! Here it is: {word.upper()}" if sloppy else word.upper()


def ranked_candidates(prompt: str, rng: random.Random) -> list[str]:
    """Program-written answers to `prompt` (right or wrong, clean or sloppy), best first by the judge,
    one per distinct gold score, so no pair is a tie trained as a preference."""
    candidates = [answer(prompt, rng, sloppy, wrong) for wrong in (False, True, True) for sloppy in (False, True)]
    by_score: dict[float, str] = {}
    for text in candidates:
        by_score.setdefault(gold_score(prompt, text), text)
    return [by_score[score] for score in sorted(by_score, reverse=True)]


def pretrain_text(rng: random.Random) -> str:
    """One plain statement of a fact the prompts ask about (no instruction format)."""
    kind = rng.choice(("add", "sort", "category", "capital"))
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a} plus {b} is {a + b}."
    if kind == "sort":
        numbers = rng.sample(range(1, 100), rng.randint(3, 5))
        return f"In order, {', '.join(map(str, numbers))} become {', '.join(map(str, sorted(numbers)))}."
    if kind == "category":
        category = rng.choice(sorted(CATEGORIES))
        items = rng.sample(sorted(CATEGORIES[category]), 3)
        return f"{items[0].capitalize()}, {items[1]} and {items[2]} are {category}."
    country = rng.choice(sorted(CAPITALS))
    return f"The capital of {country} is {CAPITALS[country]}."


def make_records(cfg: InstructionTaskConfig) -> dict[str, list[dict]]:
    """The four record sets; each set is drawn with its own seeded stream, from one pool of users."""
    users = make_users(cfg.n_users, cfg.seed)

    def stream(name: str) -> random.Random:
        return random.Random(f"instructions:{cfg.seed}:{name}")

    def prompts(rng: random.Random, n: int) -> list[tuple[User, str]]:
        return [(user, user.ask(rng)) for user in (rng.choice(users) for _ in range(n))]

    rng = stream("sft")
    sft = [{"prompt": prompt, "completion": answer(prompt, rng, sloppy=rng.random() < cfg.demo_sloppy_rate),
            "user_id": user.user_id} for user, prompt in prompts(rng, cfg.n_sft)]
    rng = stream("rankings")
    rankings = [{"prompt": prompt, "responses": ranked_candidates(prompt, rng), "user_id": user.user_id}
                for user, prompt in prompts(rng, cfg.n_rm_prompts)]
    rng = stream("prompts")
    rl = [{"prompt": prompt, "user_id": user.user_id} for user, prompt in prompts(rng, cfg.n_rl_prompts)]
    rng = stream("pretrain")
    pretrain = [{"text": pretrain_text(rng)} for _ in range(cfg.n_pretrain_texts)]
    return {"sft": sft, "rankings": rankings, "prompts": rl, "pretrain": pretrain}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def task_settings(cfg: InstructionTaskConfig) -> dict:
    """What decides the files' content (not where they go or whether to overwrite)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite")}


def write_instruction_task(out_dir: str | os.PathLike, cfg: InstructionTaskConfig | None = None,
                           overwrite: bool = False) -> Path:
    """Write the task's data directory (layout in the module docstring) and return it.

    A complete directory written with the same settings is returned as is; one written with other
    settings raises ConfigError unless `overwrite`.
    """
    cfg = cfg or InstructionTaskConfig()
    cfg.validate()
    root = Path(out_dir)
    manifest_path = root / MANIFEST
    settings = task_settings(cfg)
    if manifest_path.is_file() and not overwrite:
        found = json.loads(manifest_path.read_text(encoding="utf-8")).get("config")
        if found == settings:
            return root
        raise ConfigError(f"{root} holds an instruction task written with other settings ({found}); "
                          "pass --overwrite true or choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # incomplete until the manifest is back
    records = make_records(cfg)
    for name, file in RECORD_FILES.items():
        _write_atomic(root / file, "".join(json.dumps(record) + "\n" for record in records[name]))
    # the one train / tune / test split of the users that every stage and eval read (rlhf/data/split.py;
    # imported here: rlhf.data's package imports torch, and `rlhf instructions --help` must not)
    from rlhf.data.split import SPLIT_FILE, UserSplit

    users = [user.user_id for user in make_users(cfg.n_users, cfg.seed)]
    UserSplit.for_users(users, cfg.seed, TUNE_FRACTION, TEST_FRACTION).write(root / SPLIT_FILE)
    manifest = {"task": "instructions", "gold": "instructions", "config": settings,
                "counts": {name: len(rows) for name, rows in records.items()}}
    _write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return root


def write_from_config(cfg: InstructionTaskConfig) -> Path:
    """`rlhf instructions --out DIR`."""
    root = write_instruction_task(cfg.out_dir, cfg, overwrite=cfg.overwrite)
    print(f"instruction task in {root}: {', '.join(RECORD_FILES.values())}, {MANIFEST} (gold judge: instructions)")
    return root

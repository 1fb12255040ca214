"""The README's Python API snippet builds the same configs as its CLI example (issue 19.7): the same
config means the same numbers. Both run with the stage entry points replaced by a recorder."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

import rlhf.ppo
import rlhf.reward
import rlhf.sft
from rlhf.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(after_heading: str, language: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(after_heading)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    return match.group(1)


@pytest.fixture
def recorded(monkeypatch) -> dict:
    """Each stage's `train` records its config instead of training; returns {stage: [configs]}."""
    calls: dict[str, list] = {"sft": [], "rm": [], "ppo": []}
    for stage, module in (("sft", rlhf.sft), ("rm", rlhf.reward), ("ppo", rlhf.ppo)):
        def train(cfg, stage=stage):
            calls[stage].append(cfg)
            return Path(cfg.out_dir)
        monkeypatch.setattr(module, "train", train)
    return calls


def without_model_path(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=""))


def test_the_python_snippet_builds_the_cli_example_configs(recorded):
    exec(readme_block("### The Python API in ten lines", "python"), {})
    api = {stage: configs[-1] for stage, configs in recorded.items()}

    cli_example = readme_block("## Using your own model and data", "bash").replace("\\\n", " ")
    for line in cli_example.splitlines():
        argv = shlex.split(line.split("#")[0])
        if argv and argv[0] == "rlhf" and argv[1] in recorded:
            assert main(argv[1:]) == 0
    cli = {stage: configs[-1] for stage, configs in recorded.items()}

    assert api["rm"].data.demonstrations == cli["rm"].data.demonstrations != ""  # the RM's normalisation set
    for stage in recorded:  # the model directories differ by name only
        assert without_model_path(api[stage]) == without_model_path(cli[stage]), stage

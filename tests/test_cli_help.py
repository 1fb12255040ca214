"""`rlhf <command> --help` answers without importing torch (issue 19.2): it reads only the torch-free
config modules, never the stage that trains."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from rlhf.cli import COMMANDS

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


def run_rlhf(*args: str) -> subprocess.CompletedProcess:
    # -X importtime lists every module the process imported, on stderr
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "rlhf", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)


def imported(stderr: str) -> set[str]:
    """The module names in `-X importtime` output (`import time: self | cumulative | name`)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_no_torch(command):
    result = run_rlhf(command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"usage: rlhf {command}" in result.stdout
    modules = imported(result.stderr)
    assert "rlhf.cli" in modules  # the probe works: it sees our own imports
    assert not {m for m in modules if m.split(".")[0] in HEAVY}, "--help imported a heavy library"


def test_help_takes_under_two_seconds():
    # the bound; generous: without torch it takes ~0.1 s, with torch 8 s on an idle machine
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rlhf", "sft", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.perf_counter() - start < 2.0


def test_config_modules_are_torch_free():
    """Every config class, from its torch-free module, in a fresh interpreter."""
    code = ("import sys\n"
            "import rlhf.sft_config, rlhf.reward_config, rlhf.ppo.config, rlhf.eval_config, rlhf.pipeline_config\n"
            "import rlhf.models.config, rlhf.optim_config, rlhf.toy.config\n"
            "from rlhf.models import ModelConfig\n"
            "from rlhf.ppo import PPOConfig\n"
            "from rlhf.toy import ToyConfig\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_old_import_paths_still_work():
    from rlhf.eval import EvalConfig, EvalData
    from rlhf.pipeline import PipelineConfig, PipelineData
    from rlhf.reward import RMConfig, RMData
    from rlhf.sft import SFTConfig, SFTData
    from rlhf.toy.command import ToyRunConfig
    from rlhf.training import OptimConfig

    import rlhf.eval_config, rlhf.optim_config, rlhf.pipeline_config, rlhf.reward_config, rlhf.sft_config
    import rlhf.toy.config

    assert (SFTConfig, SFTData) == (rlhf.sft_config.SFTConfig, rlhf.sft_config.SFTData)
    assert (RMConfig, RMData) == (rlhf.reward_config.RMConfig, rlhf.reward_config.RMData)
    assert (EvalConfig, EvalData) == (rlhf.eval_config.EvalConfig, rlhf.eval_config.EvalData)
    assert (PipelineConfig, PipelineData) == (rlhf.pipeline_config.PipelineConfig, rlhf.pipeline_config.PipelineData)
    assert OptimConfig is rlhf.optim_config.OptimConfig
    assert ToyRunConfig is rlhf.toy.config.ToyRunConfig

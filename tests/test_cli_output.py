"""What a user sees besides the results (issue 19.7, 19.9): one behaviour for the CLI and the Python API
(progress lines on, the bitsandbytes kernel warning off), no loading bars, `--version`, a quiet pipe."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import torch

from rlhf.cli import main


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rlhf {importlib.metadata.version('rlhf-lean')}"


def test_help_into_a_closed_pipe_ends_quietly():
    # `rlhf -h | head -3`: the reader is gone before rlhf writes (closed at once, long before Python
    # has even started), so the write fails every time
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "-h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_api_users_see_progress_lines_without_configuring_logging():
    shown = python("import logging, rlhf; logging.getLogger('rlhf.sft').info('SFT: %d train', 5)")
    assert shown.returncode == 0, shown.stderr
    assert " INFO rlhf.sft: SFT: 5 train" in shown.stderr
    # once the application configures logging, its handlers print the line, once
    configured = python("import logging, rlhf; logging.basicConfig(format='app %(name)s %(message)s'); "
                        "logging.getLogger('rlhf.sft').info('SFT: %d train', 5)")
    assert configured.stderr.count("SFT: 5 train") == 1 and "app rlhf.sft SFT: 5 train" in configured.stderr
    silenced = python("import logging, rlhf; logging.getLogger('rlhf').setLevel(logging.WARNING); "
                      "logging.getLogger('rlhf.sft').info('SFT: %d train', 5)")
    assert "SFT: 5 train" not in silenced.stderr


def test_the_bitsandbytes_kernel_warning_is_hidden_for_api_users():
    result = python("import sys, rlhf.models.roles; assert 'bitsandbytes' in sys.modules, 'no bitsandbytes'")
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "pip install kernels" not in result.stderr


def test_loading_the_base_shows_no_weights_bar(tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from rlhf.models import ModelConfig, load_tokenizer
    from rlhf.models.base import load_base_model

    path = tiny_model_dir("llama")
    AutoModelForCausalLM.from_pretrained(path)
    assert "Loading weights" in capsys.readouterr().err  # the probe: transformers shows it by default
    load_base_model(ModelConfig(path=str(path), quantization="none"), load_tokenizer(str(path)), torch.device("cpu"))
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # only our load is quiet: the user's setting is back


def test_eval_table_says_why_a_column_is_empty():
    from rlhf.eval import format_table

    row = {"rm_score": 0.5, "kl_to_sft": 0.0, "answer_length": 3.0, "pretrain_loss": None}
    table = format_table({"policies": {"sft": row, "ppo": dict(row)}, "n_prompts": 10, "answers_per_prompt": 4})
    assert "gold_score, win_rate_vs_sft: - (they need a gold judge: --gold toy" in table
    assert "pretrain_loss: - (needs pretraining text: --pretrain pretrain.jsonl)" in table
    judged = {"sft": {**row, "gold_score": 0.7, "pretrain_loss": 2.0},
              "ppo": {**row, "gold_score": 0.8, "win_rate_vs_sft": 0.6, "pretrain_loss": 2.1}}
    table = format_table({"policies": judged, "n_prompts": 10, "answers_per_prompt": 4})
    assert "gold judge" not in table and "needs pretraining" not in table

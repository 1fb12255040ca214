"""`rlhf.progress.progress`: tqdm on a terminal; elsewhere INFO lines with step/total, the metrics and an
ETA, every N steps and at the end, never a carriage return. Every loop of the package uses it."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

import rlhf.progress
from rlhf.progress import LogProgress, format_duration, progress

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, step_s: float):
        self.now, self.step_s = 1000.0, step_s

    def __call__(self) -> float:
        return self.now


def run_loop(bar, clock: FakeClock) -> None:
    for i in bar:
        clock.now += clock.step_s  # the step's work
        bar.set_postfix({"train_loss": 1.0 / (i + 1), "note": "a\rb\nc"})


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rlhf.progress"]


@pytest.fixture
def log_file_stderr(monkeypatch):
    """stderr redirected to a file (not a terminal), as under `rlhf ... 2> log` or nohup."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_not_a_terminal_logs_step_total_metrics_and_eta_every_n_steps_and_at_the_end(log_file_stderr, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    clock = FakeClock(step_s=2.0)
    bar = progress(range(10), total=10, desc="sft", unit="step", every=4)
    assert isinstance(bar, LogProgress)
    bar.clock, bar.start_t, bar.last_line_t = clock, clock.now, clock.now  # every step takes 2 s
    run_loop(bar, clock)
    got = lines(caplog)
    assert [re.match(r"sft (\d+)/10 ", line).group(1) for line in got] == ["1", "4", "8", "10"]
    assert got[1] == "sft 4/10 (40%) train_loss=0.25 note=a b c | 2 s/step, elapsed 0:08, ETA 0:12"
    assert got[-1].endswith("train_loss=0.1 note=a b c | 2 s/step, elapsed 0:20, ETA 0:00")
    assert not any("\r" in line or "\n" in line for line in got)
    assert log_file_stderr.getvalue() == ""  # no bar drawn into the file


def test_a_slow_loop_logs_at_least_every_interval(log_file_stderr, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    clock = FakeClock(step_s=61.0)
    bar = LogProgress(range(5), desc="ppo", unit="it", every=1000, clock=clock)
    run_loop(bar, clock)
    assert [line.split(" |")[0].split()[1] for line in lines(caplog)] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert "61 s/it" in lines(caplog)[0]


def test_a_resumed_loop_counts_from_initial_and_times_only_its_own_steps(log_file_stderr, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    clock = FakeClock(step_s=1.0)
    bar = LogProgress(range(90, 100), total=100, initial=90, desc="rm", unit="step", every=5, clock=clock)
    run_loop(bar, clock)
    assert [line.split()[1] for line in lines(caplog)] == ["91/100", "95/100", "100/100"]
    assert lines(caplog)[0].endswith("| 1 step/s, elapsed 0:01, ETA 0:09")


def test_default_every_gives_about_twenty_lines_and_update_works_without_iterating(log_file_stderr, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    clock = FakeClock(step_s=1.0)
    with LogProgress(total=1000, desc="label", unit="batch", clock=clock) as bar:
        for _ in range(1000):
            clock.now += clock.step_s
            bar.update()
    counts = [line.split()[1] for line in lines(caplog)]
    assert counts[:3] == ["1/1000", "50/1000", "100/1000"] and counts[-1] == "1000/1000" and len(counts) == 21


def test_a_fast_loop_logs_no_closer_than_the_minimum_interval_but_always_its_first_and_last_step(
        log_file_stderr, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    clock = FakeClock(step_s=0.5)  # every=1 wants a line a step; 2 s apart at least gives one every 4 steps
    run_loop(LogProgress(range(10), desc="rm demonstration scores", unit="batch", every=1, clock=clock), clock)
    assert [line.split()[3] for line in lines(caplog)] == ["1/10", "5/10", "9/10", "10/10"]


def test_a_terminal_gets_the_tqdm_bar_and_no_log_lines(monkeypatch, caplog):
    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    bar = progress(range(3), total=3, desc="sft", unit="step")
    assert isinstance(bar, tqdm)
    run_loop(bar, FakeClock(0.0))
    assert "\r" in terminal.getvalue() and "sft" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert lines(caplog) == []


def test_without_logging_configured_the_lines_go_to_stderr_without_carriage_returns():
    """A Python script run into a log file, nothing configured: INFO would be dropped, so the lines are
    printed to stderr (a pipe here, not a terminal)."""
    code = ("from rlhf.progress import progress\n"
            "bar = progress(range(5), desc='toy pretrain', unit='step', every=2)\n"
            "for i in bar: bar.set_postfix(loss=f'{1 / (i + 1):.3f}')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "\r" not in proc.stderr
    # a fast loop: its first and last steps (the lines between are MIN_INTERVAL_S apart at least)
    # "HH:MM:SS INFO rlhf.progress: <line>", from the rlhf logger's handler for unconfigured logging
    assert [line.split("rlhf.progress: ", 1)[1].split(" |")[0] for line in proc.stderr.splitlines()] == [
        "toy pretrain 1/5 (20%) loss=1.000", "toy pretrain 5/5 (100%) loss=0.200"]
    assert all("ETA" in line for line in proc.stderr.splitlines())


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 3723)] == ["0:00", "1:00", "1:01", "1:00:00",
                                                                       "1:02:03"]


def test_every_loop_of_the_package_uses_progress_not_tqdm():
    """tqdm alone draws carriage-return bars into log files; only rlhf/progress.py may import it."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "rlhf").rglob("*.py")
                 if "tqdm" in p.read_text(encoding="utf-8") and p != Path(rlhf.progress.__file__)]
    assert offenders == []
    uses = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rlhf").rglob("*.py")
            if "progress(" in p.read_text(encoding="utf-8")}
    assert {"rlhf/sft.py", "rlhf/reward.py", "rlhf/ppo/loop.py", "rlhf/eval.py", "rlhf/labelling.py",
            "rlhf/toy/pretrain.py"} <= uses


def test_sft_and_rm_stages_log_their_progress_into_a_log_file(quick_toy_world, tmp_path, log_file_stderr, caplog,
                                                              one_torch_thread):
    """The stage loops and the RM normalisation, with stderr going to a file: step lines with the
    stage's metrics and an ETA, and nothing on stderr."""
    from rlhf.config import load_config
    from rlhf.reward import RMConfig
    from rlhf.reward import train as train_rm
    from rlhf.sft import SFTConfig
    from rlhf.sft import train as train_sft

    caplog.set_level(logging.INFO, logger="rlhf.progress")
    common = {"model.path": str(quick_toy_world.model), "model.quantization": "none", "device": "cpu",
              "epochs": 1, "log_every": 1, "eval_every": 1000, "checkpoint_every": 1000}
    sft_dir = train_sft(load_config(SFTConfig, overrides={
        **common, "data.path": str(quick_toy_world.sft), "out_dir": str(tmp_path / "sft"), "batch_size": 64,
        "micro_batch_size": 64}))
    train_rm(load_config(RMConfig, overrides={
        **common, "data.path": str(quick_toy_world.rankings), "data.demonstrations": str(quick_toy_world.sft),
        "sft_dir": str(sft_dir), "out_dir": str(tmp_path / "rm"), "batch_size": 64, "micro_batch_size": 64}))
    got = lines(caplog)
    sft = [line for line in got if line.startswith("sft ")]
    assert re.fullmatch(r"sft 1/(\d+) \(\d+%\) train_loss=\d\.\d{3} \| .*, ETA \d+:\d\d", sft[0]), sft
    assert "val_loss=" in sft[-1] and sft[-1].endswith("ETA 0:00")
    assert any(line.startswith("rm ") and "train_loss=" in line for line in got), got
    assert any(line.startswith("rm demonstration scores ") for line in got), got
    assert not any("\r" in line for line in got) and log_file_stderr.getvalue() == ""

"""Data parallelism on two CPU processes (gloo), launched the way a user launches it:
`accelerate launch --multi_gpu --num_processes 2 -m rlhf <stage> ...` (`rlhf/distributed.py`).

SFT and the RM on 2 processes give the 1-process adapters for the same global batch (fp32,
quantization none, no dropout: within 1e-5; the sums only run in another order); rank 0 alone writes
the run dir and every rank's random state; a checkpoint of 2 processes is not resumed by 1. The
helpers' sharding and no-op behaviour are checked directly, with a faked rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf import distributed
from rlhf.checkpoint import load_trainer_state
from rlhf.config import load_config
from rlhf.errors import ConfigError
from rlhf.metrics import read_metrics
from rlhf.reward import RMConfig
from rlhf.reward import train as train_rm
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # fp32: the same sums in another order (measured: ~5e-8 on the adapters, 3e-6 on nothing)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(n: int, stage: str | None, overrides: dict[str, object],
                   script: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port())] + (script or ["-m", "rlhf", stage])
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return cmd


def launch(n: int, stage: str | None, overrides: dict[str, object], timeout_s: float = 300,
           env: dict[str, str] | None = None, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes n -m rlhf <stage> --key value ...` in a subprocess
    (or `... script args` for a test's own script)."""
    cmd = launch_command(n, stage, overrides, script)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": "1", "RLHF_KERNELS_BACKEND": "torch", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout_s)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _max_diff(dir_a: Path, dir_b: Path, name: str) -> float:
    a, b = load_file(dir_a / name), load_file(dir_b / name)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def sft_overrides(world, out: Path) -> dict[str, object]:
    # 32 rows per step: 16 per process on 2, in micro-batches of 8 (accumulation 2 on each)
    return {"model.path": world.model, "model.quantization": "none", "model.lora_dropout": 0.0,
            "data.path": world.sft, "out_dir": out, "device": "cpu", "precision": "fp32", "epochs": 1,
            "batch_size": 32, "micro_batch_size": 8, "log_every": 2, "eval_every": 3, "checkpoint_every": 3}


def rm_overrides(world, sft_dir: Path, out: Path) -> dict[str, object]:
    return {"model.path": world.model, "model.quantization": "none", "data.path": world.rankings,
            "sft_dir": sft_dir, "out_dir": out, "device": "cpu", "precision": "fp32", "batch_size": 8,
            "micro_batch_size": 2, "log_every": 2, "eval_every": 6, "checkpoint_every": 100}


def _config(cls, overrides: dict[str, object]):
    return load_config(cls, overrides={k: v if isinstance(v, (int, float, bool)) else str(v)
                                       for k, v in overrides.items()})


@pytest.fixture(scope="module")
def sft_runs(quick_toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-sft")
    one = train_sft(_config(SFTConfig, sft_overrides(quick_toy_world, root / "one")))
    proc = launch(2, "sft", sft_overrides(quick_toy_world, root / "two"))
    _check(proc)
    return one, root / "two"


@pytest.mark.slow
def test_sft_on_two_processes_gives_the_one_process_adapter(sft_runs):
    one, two = sft_runs
    assert _max_diff(one / "policy", two / "policy", "adapter_model.safetensors") < TOLERANCE
    # rank 0 alone logs: one row per logged step, and the global validation loss equals the 1-process one
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    assert rows_two[-1]["val_loss"] == pytest.approx(rows_one[-1]["val_loss"], abs=1e-5)
    assert rows_two[-1]["train_loss"] == pytest.approx(rows_one[-1]["train_loss"], abs=1e-5)
    state = load_trainer_state(two / "checkpoints" / "step-00000006")
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert state["rng_per_rank"][0]["torch"].ne(state["rng_per_rank"][1]["torch"]).any()  # a stream per rank
    # a 1-process checkpoint is as it was
    assert "world_size" not in load_trainer_state(one / "checkpoints" / "step-00000006")


@pytest.mark.slow
def test_a_two_process_checkpoint_is_not_resumed_by_one_process(quick_toy_world, sft_runs, tmp_path):
    _, two = sft_runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(two, unfinished)
    (unfinished / "DONE").unlink()
    shutil.rmtree(unfinished / "checkpoints" / "step-00000006")  # as if killed after step 3's checkpoint
    with pytest.raises(ConfigError, match=r"written by a run on 2 process\(es\); this launch has 1. Resume with "
                                          r"--num_processes 2"):
        train_sft(_config(SFTConfig, sft_overrides(quick_toy_world, unfinished)))


@pytest.mark.slow
def test_an_error_on_rank_zero_stops_every_rank_with_its_message(quick_toy_world, sft_runs):
    """Rank 0 alone opens the run dir; its refusal reaches rank 1, which would otherwise wait for it."""
    sft_dir, two = sft_runs
    proc = launch(2, "rm", rm_overrides(quick_toy_world, sft_dir, two))  # an SFT run dir: refused
    assert proc.returncode != 0
    assert f"run dir {two} holds a sft run, not a rm one" in proc.stderr
    assert re.search(r"rank 1 of 2: opening run dir \S+ failed on rank 0: ConfigError: run dir \S+ holds a sft "
                     r"run, not a rm one", proc.stderr), proc.stderr[-3000:]


@pytest.mark.slow
def test_rm_on_two_processes_gives_the_one_process_reward_model(quick_toy_world, sft_runs, tmp_path):
    sft_dir, _ = sft_runs
    one = train_rm(_config(RMConfig, rm_overrides(quick_toy_world, sft_dir, tmp_path / "one")))
    # the `rlhf <stage> --num_processes N` shortcut (the CLI runs accelerate launch --multi_gpu for us)
    cli = [sys.executable, "-m", "rlhf", "rm", "--num_processes", "2"]
    for key, value in rm_overrides(quick_toy_world, sft_dir, tmp_path / "two").items():
        cli += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RLHF_KERNELS_BACKEND": "torch"}
    proc = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _check(proc)
    assert "rank 1 of 2 joined the process group" in proc.stderr
    two = tmp_path / "two"
    assert _max_diff(one / "reward", two / "reward", "adapter_model.safetensors") < TOLERANCE
    # the head, with the normalising offset taken over every process's share of the demonstrations
    assert _max_diff(one / "reward", two / "reward", "head.safetensors") < TOLERANCE
    last_one, last_two = read_metrics(one)[-1], read_metrics(two)[-1]
    for key in ("val_loss", "val_pairwise_accuracy", "val_score_mean", "val_score_std", "offset"):
        assert last_two[key] == pytest.approx(last_one[key], abs=1e-5), key


@pytest.mark.slow
def test_one_ppo_update_from_a_fixed_rollout_gives_the_same_weights_on_one_and_two_processes(quick_toy_world,
                                                                                              tmp_path):
    """tests/ddp_ppo_update_worker.py: 2 epochs x 2 mini-batches of 4 micro-batches, ptx rows shared out; on 2
    processes each runs every other micro-batch and the gradients are summed before clipping."""
    worker = ROOT / "tests" / "ddp_ppo_update_worker.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RLHF_KERNELS_BACKEND": "torch"}
    one = subprocess.run([sys.executable, str(worker), str(quick_toy_world.model), str(tmp_path / "one.pt")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _check(one)
    _check(launch(2, None, {}, script=[str(worker), str(quick_toy_world.model), str(tmp_path / "two.pt")]))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(one["params"]) == len(two["params"]) > 0
    for a, b in zip(one["params"], two["params"]):
        torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCE)
    assert two["stats"].keys() == one["stats"].keys()
    for key, value in one["stats"].items():  # the logged means are those of the whole mini-batches
        assert two["stats"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_when_one_rank_is_killed_the_other_stops_naming_its_rank_and_resume_auto_finishes_the_run(
        quick_toy_world, tmp_path):
    """Kill rank 1 with SIGKILL once checkpoint 3 exists: rank 0's next collective fails (gloo sees the closed
    connection; a silent peer would hit RLHF_DISTRIBUTED_TIMEOUT_S) and it stops with our message; the
    launcher names the dead rank. The same command again resumes and ends with the 1-process adapter."""
    import psutil

    out = tmp_path / "killed"
    overrides = {**sft_overrides(quick_toy_world, out), "epochs": 6, "eval_every": 1000}  # 36 steps
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RLHF_KERNELS_BACKEND": "torch",
           distributed.TIMEOUT_ENV: "60"}
    cmd = launch_command(2, "sft", overrides)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        checkpoint = out / "checkpoints" / "step-00000003"
        while not checkpoint.is_dir() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before rank 1 could be killed"
        ranks = {c.environ().get("RANK"): c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "rlhf" in c.cmdline()}
        ranks["1"].kill()
        output, _ = proc.communicate(timeout=240)  # bounded: the others stop, they do not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (out / "DONE").exists()
    assert re.search(r"rank 0 of 2: \S+ failed: another process stopped or did not answer within 60 s", output), \
        output[-3000:]
    assert re.search(r"local_rank: 1 \(pid: \d+\)|rank\s*: 1", output), output[-3000:]  # the launcher names it
    resumed = launch(2, "sft", overrides)
    _check(resumed)
    assert "sft: resumed from" in resumed.stderr
    one = train_sft(_config(SFTConfig, {**overrides, "out_dir": tmp_path / "one"}))
    assert _max_diff(one / "policy", out / "policy", "adapter_model.safetensors") < TOLERANCE
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == sorted(set(steps))  # the resumed log reads as one run


QUICK_TOY = {"toy.n_users": 12, "toy.n_sft_prompts": 200, "toy.n_rm_prompts": 100, "toy.n_rl_prompts": 100,
             "toy.n_pretrain_texts": 500, "toy.hidden_size": 64, "toy.pretrain_steps": 30, "toy.warmup_steps": 3,
             "toy.batch_size": 32}  # = ToyConfig.quick(): the pipeline finds the quick world already written


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_two_processes(quick_toy_world, tmp_path):
    """Labelling, SFT, RM, PPO, PPO-ptx and the evaluation, each on 2 processes (smallest sizes)."""
    out = tmp_path / "pipeline"
    shutil.copytree(quick_toy_world.root, out / "toy")
    proc = launch(2, "pipeline", {
        "out_dir": out, **QUICK_TOY, "quantization": "none", "device": "cpu", "rm_k": 4,
        "sft.epochs": 1, "sft.batch_size": 16, "sft.micro_batch_size": 8, "sft.eval_every": 1000,
        "rm.batch_size": 8, "rm.micro_batch_size": 4, "rm.eval_every": 1000,
        "ppo.iterations": 2, "ppo.rollout.batch_size": 8, "ppo.mini_batch_size": 8, "ppo.micro_batch_size": 4,
        "ppo.ppo_epochs": 1, "ppo.rollout.max_new_tokens": 8, "ppo.ptx_batch_size": 4,
        "eval.data.max_prompts": 16, "eval.data.max_pretrain_chunks": 16, "eval.answers_per_prompt": 2,
        "eval.best_of_n": [1, 2], "eval.temperatures": [0.5], "eval.bootstrap_resamples": 200},
        timeout_s=600)
    _check(proc)
    assert "toy world already complete" in proc.stderr
    for stage in ("sft", "rm", "ppo", "ppo_ptx"):
        assert (out / stage / "DONE").is_file(), stage
    # rank 0 alone logged: each PPO iteration once
    assert [r["step"] for r in read_metrics(out / "ppo")] == [1, 2]
    rankings = [json.loads(line) for line in (out / "rm_rankings.jsonl").read_text().splitlines()]
    assert rankings and all(len(r["responses"]) >= 2 for r in rankings)
    # both ranks' shares (each half of the RM prompts), gathered in the prompts' order
    order = {json.loads(line)["prompt"]: i for i, line in enumerate(quick_toy_world.rankings.read_text().splitlines())}
    positions = [order[r["prompt"]] for r in rankings]
    assert positions == sorted(positions) and positions[0] < len(order) // 2 <= positions[-1]
    result = json.loads((out / "eval.json").read_text())
    assert list(result["policies"]) == ["sft", "best_of_1", "best_of_2", "sft_t0.5", "ppo", "ppo_ptx"]
    assert 0 < result["n_prompts"] <= 16
    assert set(result["win_rate_vs_sft"]) == {"ppo", "ppo_ptx"}
    assert result["policies"]["sft"]["kl_to_sft"] == 0.0  # the gathered samples line up with SFT's own
    assert proc.stdout.count("sft_t0.5") == 1  # the table is printed once, by rank 0


@pytest.mark.slow
def test_the_ppo_step_benchmark_on_two_processes_reports_total_and_per_process_tokens_per_s(tmp_path):
    out = tmp_path / "ppo_step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ppo_step", "--smoke", "--num_processes", "2", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _check(proc)
    ours = json.loads(out.read_text())["results"]["ours"]
    assert ours["num_processes"] == 2
    assert ours["per_process_tokens_per_s"] == pytest.approx(ours["total_tokens_per_s"] / 2)
    assert re.search(r"on 2 processes: [\d.]+ tokens/s in total, [\d.]+ per process", proc.stdout)


# ------------------------------------------------------------------ the helpers, with a faked rank
@pytest.fixture
def rank_of_two(monkeypatch):
    def fake(rank: int) -> None:
        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
    return fake


def test_each_process_gets_an_equal_contiguous_share_of_the_global_batch(rank_of_two):
    rank_of_two(1)
    assert distributed.shard([10, 11, 12, 13, 14, 15], "batch_size") == [13, 14, 15]
    assert distributed.eval_share([1, 2, 3, 4, 5]) == [3, 4, 5]  # evaluation: uneven by at most one
    rank_of_two(0)
    assert distributed.shard([10, 11, 12, 13, 14, 15], "batch_size") == [10, 11, 12]
    assert distributed.eval_share([1, 2, 3, 4, 5]) == [1, 2]
    with pytest.raises(ConfigError, match=r"batch_size=5 must be divisible by the number of processes \(2\)"):
        distributed.shard([1, 2, 3, 4, 5], "batch_size")


def test_rank_seeds_differ_and_rank_zero_keeps_the_seed(rank_of_two):
    rank_of_two(0)
    zero = distributed.rank_seed(7)
    rank_of_two(1)
    assert zero == 7 and distributed.rank_seed(7) != 7


def test_not_launched_every_helper_returns_its_input_untouched():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_sum(t) is t and t.tolist() == [1.0, 2.0]
    rows = list(range(5))
    assert distributed.shard(rows, "batch_size") == rows and distributed.eval_share(rows) is rows
    assert distributed.gather_cat(t) is t and distributed.any_true(True) and not distributed.any_true(False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.all_reduce_grads([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    assert distributed.on_main(lambda: 5, "x") == 5


def test_a_bad_timeout_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=r"RLHF_DISTRIBUTED_TIMEOUT_S='soon' is not a number of seconds"):
        distributed.timeout_s()


def test_an_out_of_memory_on_another_rank_halves_the_micro_batch_here_too(monkeypatch):
    """This rank's step went through, another one ran out of memory: every rank halves and redoes the step."""
    from rlhf.training import MicroBatchHalver

    others_oom = iter([True, False])  # the all-reduced flag: set by another rank on the first attempt only
    monkeypatch.setattr(distributed, "any_true", lambda flag, device=None: next(others_oom) or flag)
    halver = MicroBatchHalver(8, True, "SFT training", ["micro_batch_size"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sizes = []
    assert halver.run(lambda micro: sizes.append(micro) or micro, optimizer) == 4
    assert sizes == [8, 4] and halver.micro_batch_size == 4


@pytest.mark.parametrize("args, message", [
    (["sft", "--num_processes", "two"], "--num_processes: expected a whole number >= 1, got 'two'"),
    (["sft", "--num_processes=0"], "--num_processes: expected a whole number >= 1, got '0'"),
    (["toy", "--num_processes", "2"], "--num_processes: `rlhf toy` writes the toy world in one process"),
])
def test_the_num_processes_shortcut_refuses_a_bad_value(args, message, capsys):
    from rlhf.cli import main

    assert main(args) == 2
    assert message in capsys.readouterr().err

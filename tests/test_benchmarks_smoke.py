"""The benchmark scripts run end to end on CPU in their --smoke modes (issue 8): each in a subprocess,
as a user would start it (`python -m benchmarks.<script>` from the repository root, no sys.path
edits), writing its JSON to a temp dir. The TRL peer runs only where its venv
(benchmarks/setup_trl_venv.sh) exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"


def run_script(module, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RLHF_KERNELS_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_record(path):
    record = json.loads(Path(path).read_text())
    for key in ("device", "torch", "commit", "date", "results"):
        assert key in record, key
    return record


def test_kernels_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    stdout = run_script("kernel_bench", "--smoke", "--out", str(out))
    assert "x faster" in stdout
    record = check_record(out)
    assert all("ms" in row for row in record["results"] if row["provider"] in ("ours", "torch"))


def test_ppo_step_smoke(tmp_path):
    out = tmp_path / "ppo_step.json"
    stdout = run_script("ppo_step", "--smoke", "--out", str(out))
    assert "ours (PPO-ptx)" in stdout
    ours = check_record(out)["results"]["ours"]
    assert ours["total_s"]["n"] == 2 and ours["total_s"]["median"] > 0
    assert ours["answer_tokens_per_iteration"] == 4 * 8  # fixed-length answers: batch 4 x 8 tokens
    assert {"rollout_s", "score_s", "update_s", "peak_rss_mib"} <= set(ours)


def test_ppo_step_on_a_local_model_with_real_prompts(tmp_path):
    """--model DIR: the model's own tokenizer and chat template over the instruction task's prompts, rows of
    exactly --prompt-len ids that end where a prompt ends; NF4 and unquantized."""
    from byte_level_model import build_byte_level_model

    model_dir = build_byte_level_model(tmp_path / "model", chat_template=True)
    for quantization in ("none", "nf4"):
        out = tmp_path / f"ppo_step-{quantization}.json"
        stdout = run_script("ppo_step", "--model", str(model_dir), "--quantization", quantization, "--batch", "2",
                            "--answer-len", "4", "--prompt-len", "24", "--ppo-epochs", "1", "--iterations", "1",
                            "--warmup", "1", "--ptx-batch", "2", "--ptx-len", "16", "--out", str(out))
        record = check_record(out)
        assert record["model"]["model_type"] == "llama" and "shape" not in record
        assert record["settings"]["chat_template"] and record["settings"]["mean_prompt_tokens"] > 24
        assert "instruction task" in stdout or "rlhf.tasks.instructions" in stdout
        ours = record["results"]["ours"]
        assert ours["answer_tokens_per_iteration"] == 2 * 4 and ours["total_s"]["median"] > 0
        assert {"rollout_s", "score_s", "update_s", "peak_rss_mib"} <= set(ours)


def test_fixed_length_rows_end_where_prompts_end():
    from benchmarks.real_prompts import fixed_length_rows

    # prompt ids [1 2 3], [4 5], [6 7 8 9]; rows of 4 ids: the first prompt alone is too short to end a row
    assert fixed_length_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, 3) == [[2, 3, 4, 5], [6, 7, 8, 9], [9, 1, 2, 3]]


@pytest.mark.skipif(not TRL_PYTHON.exists(), reason="TRL peer venv missing (bash benchmarks/setup_trl_venv.sh)")
def test_ppo_step_smoke_trl_peer(tmp_path):
    out = tmp_path / "ppo_step_trl.json"
    stdout = run_script("ppo_step", "--smoke", "--providers", "ours-noptx", "trl-nogc", "--rounds", "2",
                        "--out", str(out))
    results = check_record(out)["results"]
    assert "error" not in results["trl-nogc"], results["trl-nogc"]
    assert results["trl-nogc"]["total_s"]["median"] > 0
    assert results["trl-nogc"]["total_s"]["n"] == 2 * 2  # two rounds of two timed iterations, pooled
    assert "x_faster_than_trl-nogc" in results["ours-noptx"]
    assert len(results["ours-noptx"]["rounds_x_faster_than_trl-nogc"]) == 2
    assert "per round (paired)" in stdout


def test_capacity_smoke(tmp_path):
    out = tmp_path / "capacity.json"
    stdout = run_script("capacity", "--smoke", "--out", str(out))
    found = check_record(out)["results"]["ours"]
    assert found["largest"] == "h128-l2" and all(row["fits"] for row in found["rows"])
    assert "largest" in stdout


def test_capacity_smoke_budget_stops_the_search(tmp_path):
    out = tmp_path / "capacity.json"
    run_script("capacity", "--smoke", "--budget-mib", "1", "--out", str(out))
    found = check_record(out)["results"]["ours"]
    assert found["largest"] is None and len(found["rows"]) == 1 and not found["rows"][0]["fits"]


def test_capacity_search_logic(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the root is on sys.path under `python -m pytest`, not always under xdist
    from benchmarks.capacity import search

    limits = {"a": 2, "b": 0}  # provider a fits rungs 0..2, b none
    tried = []

    def try_rung(name, shape, provider):
        tried.append((provider, name))
        return {"fits": shape <= limits[provider]}

    found = search({"r0": 0, "r1": 1, "r2": 2, "r3": 3, "r4": 4}, ["a", "b"], try_rung)
    assert found["a"]["largest"] == "r2" and found["b"]["largest"] == "r0"
    assert ("a", "r4") not in tried and ("b", "r2") not in tried  # stops at the first miss

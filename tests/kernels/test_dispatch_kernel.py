"""Backend choice (argument, environment variable, auto), 1-D grids, and importing without triton."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_kernels import _dispatch, gae, kl, kl_penalty, logprobs, ppo_loss, ppo_policy_loss, ppo_value_loss
from rlhf_kernels import reference, token_logprobs, value_loss

ROOT = Path(__file__).resolve().parents[2]
GAE_MODULE = importlib.import_module("rlhf_kernels.gae")  # `rlhf_kernels.gae` is the function


@pytest.fixture
def spy(monkeypatch):
    """Records which implementation `token_logprobs` ran: the Triton launcher or the reference."""
    ran = []
    for module, name, tag in ((logprobs, "_token_logprobs_fwd", "triton"),
                              (reference, "token_logprobs_fwd", "torch")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _t=tag: ran.append(_t) or _o(*a))
    return ran


def _run(**kwargs):
    token_logprobs(torch.randn(2, 9), torch.tensor([1, 2]), **kwargs)


def test_auto_under_the_interpreter_runs_triton_on_cpu(spy, monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    _run()
    _run(backend="auto")
    assert spy == ["triton", "triton"]


def test_env_var_and_argument(spy, monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    _run()
    _run(backend="triton")  # the argument wins over the environment
    monkeypatch.setenv(_dispatch.ENV_VAR, "TRITON")  # case-insensitive
    _run()
    assert spy == ["torch", "triton", "triton"]


def test_auto_without_interpreter_or_triton_picks_torch(spy, monkeypatch):
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRETED", False)
    _run()
    assert spy == ["torch"]
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(got cpu\), or TRITON_INTERPRET=1"):
        _run(backend="triton")
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="backend='triton' but triton is not installed"):
        _run(backend="triton")


def test_float64_takes_the_torch_path(spy):
    token_logprobs(torch.randn(2, 9, dtype=torch.float64), torch.tensor([1, 2]))
    assert spy == ["torch"]


def test_unknown_backend_names_its_source(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'triton', 'torch'\]; got 'cuda'"):
        _run(backend="cuda")
    monkeypatch.setenv(_dispatch.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"env RLHF_KERNELS_BACKEND must be one of .*; got 'gpu'"):
        _run()


def test_every_public_op_dispatches(monkeypatch):
    # backend="torch" must not touch a launcher: make every Triton launcher fail loudly
    launchers = ((logprobs, "_token_logprobs_fwd"), (ppo_loss, "_ppo_policy_loss_fwd"), (kl, "_kl_penalty_fwd"),
                 (value_loss, "_ppo_value_loss_fwd"), (GAE_MODULE, "_gae_fwd"))
    for module, name in launchers:
        monkeypatch.setattr(module, name, lambda *a: pytest.fail("the Triton path ran"))
    logits = torch.randn(3, 7)
    labels = torch.tensor([0, 1, 2])
    token_logprobs(logits, labels, backend="torch")
    ppo_policy_loss(logits, labels, torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.bool), backend="torch")
    kl_penalty(torch.zeros(3), torch.ones(3), "k3", backend="torch")
    gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), backend="torch")
    ppo_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool),
                   backend="torch")


@pytest.mark.parametrize("op", ["token_logprobs", "ppo_policy_loss", "gae"])
def test_rows_go_on_grid_dimension_0(op, monkeypatch):
    # Grid dimensions 1 and 2 stop at 65535; one program per row must use dimension 0 (up to 2**31 - 1).
    # The interpreter runs programs one by one, too slowly for 70000 real rows: record the grid instead.
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    rows = 70000
    if op == "token_logprobs":
        monkeypatch.setattr(logprobs, "_token_logprobs_fwd_kernel", Recorder())
        token_logprobs(torch.zeros(rows, 3), torch.zeros(rows, dtype=torch.int64), backend="triton")
    elif op == "ppo_policy_loss":
        monkeypatch.setattr(ppo_loss, "_ppo_policy_loss_fwd_kernel", Recorder())
        ppo_policy_loss(torch.zeros(rows, 3), torch.zeros(rows, dtype=torch.int64), torch.zeros(rows),
                        torch.zeros(rows), torch.ones(rows, dtype=torch.bool), backend="triton")
    else:
        monkeypatch.setattr(GAE_MODULE, "_gae_fwd_kernel", Recorder())
        gae(torch.zeros(rows, 2), torch.zeros(rows, 2), torch.ones(rows, 2, dtype=torch.bool), backend="triton")
    assert grids == [(rows,)]


def test_imports_and_runs_without_triton():
    # macOS has no triton wheels: the package must import and run its torch path without it
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, rlhf_kernels\n"
        "from rlhf_kernels import _dispatch\n"
        "assert not _dispatch.HAS_TRITON\n"
        "logp = rlhf_kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 4]))\n"
        "assert logp.shape == (2,) and (logp < 0).all()\n"
        "try:\n"
        "    rlhf_kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 4]), backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

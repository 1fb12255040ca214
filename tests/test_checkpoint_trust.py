"""Checkpoints you can trust (issue 14): they never run code, never pass off a damaged file as
good, survive kills inside a write, a re-save and a prune, and report disk errors in one line.

Numbers in test names refer to the issue's numbered failures. Kills are real: a child process
monkeypatches one call of the save path to `os._exit(9)` at that moment, and the parent resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import rlhf.checkpoint as checkpoint
import rlhf.checkpoint_state as checkpoint_state
from rlhf.checkpoint import (CHECKPOINTS, MARKER, CheckpointError, describe_os_error, latest_checkpoint,
                             load_trainer_state, resolve_resume, rng_state, save_checkpoint, save_trainer_state,
                             verify_checkpoint)
from rlhf.config import load_config
from rlhf.data import load_records
from rlhf.errors import DataError, ModelError, RLHFError
from rlhf.models.base import load_base_model, load_tokenizer
from rlhf.models.config import ModelConfig
from rlhf.ppo.kl_controller import KLController
from rlhf.sft import SFTConfig
from rlhf.sft import train as train_sft
from rlhf.training import NonFiniteGuard, OptimConfig, build_optimizer, cosine_schedule

ROOT = Path(__file__).resolve().parents[1]


def bitwise_equal(a, b) -> bool:
    """Same types, same structure, same bits (tensors and arrays by bytes, floats by hex, nan as nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a.hex() == b.hex()
    if isinstance(a, dict):
        return list(a) == list(b) and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b


def trained_state() -> dict:
    """A stage's trainer state after a few real steps: fused AdamW, the cosine LambdaLR, a generator,
    every RNG stream, the guard and the KL controller, plus the awkward leaves (inf, nan, -0.0)."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = build_optimizer(params, OptimConfig())
    assert optimizer.defaults["fused"]
    scheduler = cosine_schedule(optimizer, 10, OptimConfig())
    for _ in range(3):
        (params[0].sin().sum() + params[1].pow(2).sum()).backward()
        optimizer.step()
        scheduler.step()
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    guard = NonFiniteGuard(3)
    guard.in_a_row, guard.skipped_total = 1, 4
    return {"step": 3, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "rng": rng_state(), "guard": guard.state_dict(),
            "kl_controller": KLController(0.02, target=6.0).state_dict(), "running": [0.5, float("inf")],
            "odd": {"nan": float("nan"), "neg_zero": -0.0, "none": None, "flag": True, "__key": (1, "a"),
                    "bf16": torch.randn(2, dtype=torch.bfloat16), "empty": torch.zeros(0, 3),
                    "array": np.arange(6, dtype=np.float16).reshape(2, 3), "scalar": np.int64(7)}}


def write_state(state: dict):
    def write(directory: Path) -> None:
        save_trainer_state(directory, state)
    return write


def write_parts(step: int):
    """What a stage writes: an adapter dir with safetensors + JSON, and the trainer state (KILL_CHILD has a copy)."""
    def write(directory: Path) -> None:
        (directory / "policy").mkdir()
        save_file({"lora_A": torch.full((4, 4), float(step)), "lora_B": torch.arange(16.0).view(4, 4)},
                  str(directory / "policy" / "adapter_model.safetensors"))
        (directory / "policy" / "adapter_config.json").write_text(json.dumps({"r": 4}))
        save_trainer_state(directory, {"step": step, "rng": rng_state()})
    return write


def step_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step-{step:08d}"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---- 1. no pickles ---------------------------------------------------------------------------

def test_1_trainer_state_round_trips_bitwise_without_pickle(tmp_path, monkeypatch):
    state = trained_state()
    save_trainer_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading a trainer state must not unpickle")
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = load_trainer_state(tmp_path)
    assert bitwise_equal(state, loaded)
    # and the objects accept it back
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(params, OptimConfig())
    optimizer.load_state_dict(loaded["optimizer"])
    cosine_schedule(optimizer, 10, OptimConfig()).load_state_dict(loaded["scheduler"])
    torch.Generator().set_state(loaded["generator"])


def test_1_trainer_state_refuses_what_it_cannot_store_faithfully(tmp_path):
    with pytest.raises(TypeError, match=r"state.extra.fn: cannot store a builtin_function_or_method"):
        save_trainer_state(tmp_path, {"extra": {"fn": len}})


class _Payload:
    """Unpickling this creates `path`: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def old_pickled_checkpoint(run: Path, step: int, proof: Path) -> Path:
    """A checkpoint as versions before this one wrote it: marker without manifest, pickled state."""
    path = step_dir(run, step)
    path.mkdir(parents=True)
    with open(path / "trainer_state.pt", "wb") as fh:
        pickle.dump({"step": step, "payload": _Payload(proof)}, fh)
    (path / MARKER).write_text(json.dumps({"step": step}))
    return path


def test_1_a_pickled_checkpoint_never_runs_its_payload(tmp_path):
    proof = tmp_path / "code-ran"
    path = old_pickled_checkpoint(tmp_path / "run", 4, proof)
    with pytest.raises(RLHFError) as err:
        resolve_resume(tmp_path / "run", "auto")
    assert "step-00000004: trainer_state.pt was written by an older version" in one_line(err)
    with pytest.raises(RLHFError, match=r"resume: checkpoint .*step-00000004 cannot be used: trainer_state.pt was"):
        resolve_resume(tmp_path / "run", str(path))
    with pytest.raises(RLHFError) as err:
        load_trainer_state(path)
    assert "unpickling a file runs any code" in one_line(err)
    assert not proof.exists()


def test_1_a_pickled_checkpoint_beside_good_ones_is_skipped_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    save_checkpoint(run, 2, write_parts(2), keep_last=5)
    old_pickled_checkpoint(run, 9, tmp_path / "code-ran")
    with caplog.at_level(logging.WARNING, logger="rlhf.checkpoint"):
        assert resolve_resume(run, "auto") == step_dir(run, 2)
    assert "step-00000009 cannot be used: trainer_state.pt was written by an older version" in caplog.text
    assert not (tmp_path / "code-ran").exists()
    assert (run / CHECKPOINTS / "rejected-step-00000009").is_dir()  # set aside, not deleted


# ---- 3. and 4. corrupted, truncated, missing: named, then the newest good one -----------------

def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _break_rng_keeping_the_manifest(checkpoint: Path) -> None:
    """A trainer state that parses and matches its manifest but whose RNG entry cannot be restored."""
    structure = json.loads((checkpoint / "trainer_state.json").read_text())
    structure["rng"]["python"] = {"__tuple__": [3, [1, 2, 3], None]}
    (checkpoint / "trainer_state.json").write_text(json.dumps(structure))
    marker = json.loads((checkpoint / MARKER).read_text())
    data = (checkpoint / "trainer_state.json").read_bytes()
    marker["files"]["trainer_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / MARKER).write_text(json.dumps(marker))


FAULTS = {
    "3: 64 random bytes in the adapter": (lambda c: _flip_bytes(c / "policy" / "adapter_model.safetensors"),
                                          "policy/adapter_model.safetensors does not match its checksum"),
    "3: garbled trainer state tensors": (lambda c: _flip_bytes(c / "trainer_state.safetensors"),
                                         "trainer_state.safetensors does not match its checksum"),
    "4: truncated adapter": (lambda c: _truncate(c / "policy" / "adapter_model.safetensors"),
                             "policy/adapter_model.safetensors has .* bytes, the manifest says"),
    "4: truncated trainer state": (lambda c: _truncate(c / "trainer_state.safetensors"),
                                   "trainer_state.safetensors has"),
    "4: unreadable JSON": (lambda c: (c / "policy" / "adapter_config.json").write_text("{"),
                           "adapter_config.json has 1 bytes"),
    "4: missing file": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "4: a file never saved": (lambda c: (c / "policy" / "head.safetensors").write_bytes(b"x"),
                              "policy/head.safetensors was not part of the save"),
    "4: broken RNG entry": (_break_rng_keeping_the_manifest, "its RNG state cannot be restored"),
    "4: truncated config.yaml": (lambda c: _truncate(c / "config.yaml"), "config.yaml has"),
    "4: manifest gone": (lambda c: (c / MARKER).write_text(json.dumps({"step": 6})), "holds no manifest"),
    "4: marker garbled": (lambda c: (c / MARKER).write_text("{\"st"), "unreadable COMPLETE marker"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_3_4_a_damaged_checkpoint_is_named_and_the_older_one_is_used(tmp_path, caplog, fault):
    damage, reason = FAULTS[fault]
    config = SFTConfig(out_dir=str(tmp_path))
    for step in (3, 6):
        save_checkpoint(tmp_path, step, write_parts(step), keep_last=2, config=config)
    damage(step_dir(tmp_path, 6))
    with caplog.at_level(logging.WARNING, logger="rlhf.checkpoint"):
        assert resolve_resume(tmp_path, "auto", config) == step_dir(tmp_path, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000006 cannot be used" in w for w in warnings), warnings
    assert any(re.search(reason, w) for w in warnings), warnings
    assert any("resuming from" in w and "step-00000003" in w for w in warnings)
    # what the stage then reads loads without a traceback
    assert load_trainer_state(step_dir(tmp_path, 3))["step"] == 3
    assert load_file(str(step_dir(tmp_path, 3) / "policy" / "adapter_model.safetensors"))["lora_A"][0, 0] == 3
    # the bad one is out of the way: the next save and prune cannot count it as a checkpoint
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 3)


def test_4_no_checkpoint_left_is_an_error_not_a_fresh_start(tmp_path):
    save_checkpoint(tmp_path, 5, write_parts(5))
    _truncate(step_dir(tmp_path, 5) / "trainer_state.safetensors")
    with pytest.raises(CheckpointError) as err:
        resolve_resume(tmp_path, "auto")
    assert "none of the 1 checkpoints" in one_line(err) and "step-00000005" in str(err.value)
    assert step_dir(tmp_path, 5).is_dir()  # left where it was, so the next resume says the same


@pytest.mark.parametrize("damage", ["truncate", "garble json", "delete tensors"])
def test_4_load_trainer_state_of_a_broken_dir_is_one_line(tmp_path, damage):
    save_trainer_state(tmp_path, trained_state())
    if damage == "truncate":
        _truncate(tmp_path / "trainer_state.safetensors")
    elif damage == "garble json":
        (tmp_path / "trainer_state.json").write_text('{"step": {"__tensor__": "t999"}}')
    else:
        (tmp_path / "trainer_state.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_trainer_state(tmp_path)
    assert str(tmp_path) in one_line(err)


# ---- 7. disk and permission errors -----------------------------------------------------------

def test_7_describe_os_error():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/r/x"), "/r") == \
        "/r/x: no space left on device"
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system"), "/r") == "/r: read-only file system"
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/r/c"), "/r") == \
        "/r/c: permission denied"
    assert describe_os_error(SafetensorError("Error while serializing: I/O error: No space left on device "
                                             "(os error 28)"), "/r/a") == "/r/a: no space left on device"


@pytest.mark.parametrize("where", ["trainer state", "adapter (safetensors)", "mkdir (read-only)", "publish rename"])
def test_7_an_os_error_while_saving_is_one_line_and_loses_nothing(tmp_path, monkeypatch, where):
    save_checkpoint(tmp_path, 1, write_parts(1))
    save_checkpoint(tmp_path, 2, write_parts(2))
    before = {p: p.read_bytes() for p in (tmp_path / CHECKPOINTS).rglob("*") if p.is_file()}
    write, step, cause = write_parts(2), 2, "no space left on device"  # a re-save: the old copy must survive
    if where == "trainer state":
        def full(path, payload):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(checkpoint_state, "_write_bytes", full)
    elif where == "adapter (safetensors)":
        def write(directory):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        step = 3
    elif where == "mkdir (read-only)":
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self.name.startswith(".tmp-"):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", read_only)
        step, cause = 3, "read-only file system"
    else:
        real_rename = os.rename

        def forbidden(src, dst):
            if Path(src).name.startswith(".tmp-step-"):
                raise PermissionError(errno.EACCES, "Permission denied", str(dst))
            return real_rename(src, dst)
        monkeypatch.setattr(checkpoint.os, "rename", forbidden)
        cause = "permission denied"
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, step, write)
    assert f"checkpoint step {step} not saved: " in one_line(err) and f": {cause}; the checkpoints" in str(err.value)
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in (tmp_path / CHECKPOINTS).rglob("*") if p.is_file()}
    assert after == before  # no temp dir left, nothing older touched
    assert verify_checkpoint(step_dir(tmp_path, 2)) is None


# ---- kills inside the write, the re-save (8) and the prune (9) -------------------------------

KILL_CHILD = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    import rlhf.checkpoint as checkpoint

    def write_parts(step):  # as the test module's, without importing it (its imports are heavy)
        def write(directory):
            (directory / "policy").mkdir()
            save_file({"lora_A": torch.full((4, 4), float(step)), "lora_B": torch.arange(16.0).view(4, 4)},
                      str(directory / "policy" / "adapter_model.safetensors"))
            (directory / "policy" / "adapter_config.json").write_text(json.dumps({"r": 4}))
            checkpoint.save_trainer_state(directory, {"step": step, "rng": checkpoint.rng_state()})
        return write

    run, point = Path(sys.argv[1]), sys.argv[2]
    for step in (1, 2):
        checkpoint.save_checkpoint(run, step, write_parts(step), keep_last=2)

    def die(*args, **kwargs):
        os._exit(9)

    real_rename, real_rmtree = os.rename, shutil.rmtree
    if point == "write":
        def writer(directory):
            write_parts(3)(directory)
            (directory / "policy" / "adapter_model.safetensors").write_bytes(b"half")
            die()
        checkpoint.save_checkpoint(run, 3, writer, keep_last=2)
    elif point == "publish":
        checkpoint.os.rename = lambda src, dst: die() if ".tmp-step-" in str(src) else real_rename(src, dst)
        checkpoint.save_checkpoint(run, 3, write_parts(3), keep_last=2)
    elif point == "re-save":  # between moving step-2 aside and moving the new copy in
        checkpoint.os.rename = lambda src, dst: die() if ".tmp-step-" in str(src) else real_rename(src, dst)
        checkpoint.save_checkpoint(run, 2, write_parts(2), keep_last=2)
    elif point == "re-save-cleanup":  # new copy in place, the old one half deleted
        def half_delete(path, *args, **kwargs):
            (Path(path) / "policy" / "adapter_model.safetensors").unlink()
            die()
        checkpoint.shutil.rmtree = half_delete
        checkpoint.save_checkpoint(run, 2, write_parts(2), keep_last=2)
    elif point == "prune":  # after the marker went, inside the removal
        def half_delete(path, *args, **kwargs):
            (Path(path) / "trainer_state.json").unlink()
            die()
        checkpoint.shutil.rmtree = half_delete
        checkpoint.save_checkpoint(run, 3, write_parts(3), keep_last=2)
    raise SystemExit("the injected kill did not happen")
""")


def kill_inside(run: Path, point: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(run), point],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / CHECKPOINTS).iterdir()
                  if p.name.startswith(".tmp-") or not (p / MARKER).is_file())


@pytest.mark.parametrize("point, resumed_step, left", [
    ("write", 2, [".tmp-step-00000003"]),
    ("publish", 2, []),
    ("re-save", 2, [".tmp-old-00000002", ".tmp-step-00000002"]),  # 8: both copies under .tmp-* names
    ("re-save-cleanup", 2, [".tmp-old-00000002"]),
    ("prune", 3, ["step-00000001"]),  # 9: a step dir without its marker
])
def test_8_9_killed_inside_a_save_resumes_from_a_verified_checkpoint(tmp_path, caplog, point, resumed_step, left):
    run = tmp_path / "run"
    kill_inside(run, point)
    if point == "publish":  # killed before the rename: the complete copy waits under its temp name
        assert (run / CHECKPOINTS / ".tmp-step-00000003" / MARKER).is_file()
        resumed_step, left = 3, [".tmp-step-00000003"]
    assert leftovers(run) == left
    with caplog.at_level(logging.INFO, logger="rlhf.checkpoint"):
        found = resolve_resume(run, "auto")
    assert found == step_dir(run, resumed_step)
    assert verify_checkpoint(found) is None and load_trainer_state(found)["step"] == resumed_step
    assert leftovers(run) == []  # recovered or removed, never mistaken for a checkpoint
    save_checkpoint(run, 4, write_parts(4), keep_last=2)
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == [step_dir(run, resumed_step).name,
                                                                     "step-00000004"]


def test_8_a_killed_re_save_is_recovered_by_the_next_save_too(tmp_path):
    run = tmp_path / "run"
    kill_inside(run, "re-save")
    assert latest_checkpoint(run) == step_dir(run, 1)  # step-2 is only under .tmp-* names now
    save_checkpoint(run, 3, write_parts(3), keep_last=3)
    assert [p.name for _, p in sorted((int(p.name[5:]), p) for p in (run / CHECKPOINTS).iterdir())] == \
        ["step-00000001", "step-00000002", "step-00000003"]


def test_8_leftovers_without_any_checkpoint_are_a_warning(tmp_path, caplog):
    (tmp_path / CHECKPOINTS / ".tmp-step-00000004").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="rlhf.checkpoint"):
        assert resolve_resume(tmp_path, "auto") is None
    assert any(r.levelno == logging.WARNING and "only leftovers of interrupted saves (.tmp-step-00000004)"
               in r.getMessage() for r in caplog.records), caplog.text


def test_9_a_half_pruned_dir_left_by_an_older_version_is_removed_by_the_next_save(tmp_path):
    save_checkpoint(tmp_path, 4, write_parts(4))
    half = step_dir(tmp_path, 2)
    half.mkdir()
    (half / "config.yaml").write_text("epochs: 1\n")
    save_checkpoint(tmp_path, 5, write_parts(5))
    assert not half.exists()


def test_9_prune_removes_the_marker_first(tmp_path, monkeypatch):
    seen = []
    real_rmtree = checkpoint.shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree",
                        lambda path, *a, **k: (seen.append((Path(path) / MARKER).exists()), real_rmtree(path, *a, **k)))
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, write_parts(step), keep_last=2)
    assert seen == [False]


# ---- 10. a lone surrogate in a text field ----------------------------------------------------

def test_10_a_lone_surrogate_is_a_data_error_or_a_counted_skip(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "x \\ud800 y", "completion": "c"}\n')
    with pytest.raises(DataError) as err:
        load_records(path, "sft")
    assert f'{path}:2: field "prompt": holds a lone surrogate' in one_line(err)
    kept = load_records(path, "sft", skip_invalid=True)
    assert len(kept) == 1 and kept.skipped == {"not UTF-8": 1}
    ranked = tmp_path / "rankings.jsonl"
    ranked.write_text('{"prompt": "p", "responses": ["good", "bad \\udc00"]}\n')
    with pytest.raises(DataError, match=r'rankings.jsonl:1: field "responses\[1\]": holds a lone surrogate'):
        load_records(ranked, "rankings")


# ---- 11. a model whose pytorch_model.bin is a pickle payload ---------------------------------

def test_11_a_pickle_payload_model_is_a_one_line_model_error(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    (model_dir / "model.safetensors").unlink()
    proof = tmp_path / "code-ran"
    with open(model_dir / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(proof), fh)
    cfg = ModelConfig(path=str(model_dir), quantization="none")
    with pytest.raises(ModelError) as err:
        load_base_model(cfg, load_tokenizer(cfg.path), torch.device("cpu"))
    assert "pytorch_model.bin holds more than plain weights" in one_line(err)
    assert not proof.exists()


# ---- 3. end to end: a stage resumed past a corrupted checkpoint ends as if never stopped ------

@pytest.mark.usefixtures("one_torch_thread")
def test_3_sft_resumed_past_a_corrupted_checkpoint_matches_the_uninterrupted_run(quick_toy_world, tmp_path, caplog):
    def config(out: Path, **overrides) -> SFTConfig:
        fields = {"model.path": str(quick_toy_world.model), "model.quantization": "none", "device": "cpu",
                  "data.path": str(quick_toy_world.sft), "out_dir": str(out), "epochs": 1, "batch_size": 32,
                  "micro_batch_size": 32, "log_every": 2, "eval_every": 1000, "checkpoint_every": 2, "keep_last": 2}
        return load_config(SFTConfig, overrides={**fields, **overrides})

    reference, run = train_sft(config(tmp_path / "reference")), tmp_path / "run"
    train_sft(config(run))
    # as if killed right after the last checkpoint, whose adapter then took 64 random bytes
    (run / "DONE").unlink()
    shutil.rmtree(run / "policy")
    newest = latest_checkpoint(run)
    _flip_bytes(newest / "policy" / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger="rlhf.checkpoint"):
        train_sft(config(run, resume="auto"))
    assert f"{newest} cannot be used: policy/adapter_model.safetensors does not match its checksum" in caplog.text
    assert "resuming from" in caplog.text
    expected = load_file(str(reference / "policy" / "adapter_model.safetensors"))
    got = load_file(str(run / "policy" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

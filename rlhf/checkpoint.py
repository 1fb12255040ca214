"""Atomic, verified checkpoints in `run_dir/checkpoints/step-XXXXXXXX/`.

Saving: a stage writes its parts (adapters, heads, the trainer state of `checkpoint_state`) into
`.tmp-step-N/`; we add the run's config, then the `COMPLETE` marker, which holds the manifest (the
size and sha256 of every other file) and is written last; fsync everything; rename into place. A
kill at any moment leaves the previous checkpoints plus, at worst, leftovers that the next save or
`--resume auto` recovers or removes (see `recover_leftovers`).

Resuming: `resolve_resume` takes the newest checkpoint whose every file matches its manifest and
whose trainer state, RNG streams and config.yaml read back; a checkpoint that fails is named in a
WARNING and the next older one is tried. If none verifies, it raises rather than start afresh.
Checkpoints written before manifests existed (they hold a pickled `trainer_state.pt`) are refused:
we cannot check them, and unpickling runs code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError

from rlhf.checkpoint_state import (HOW_TO_RESTART, PICKLED_FILE, PICKLED_REFUSAL, STRUCTURE_FILE,
                                   CheckpointError, check_rng_state, load_trainer_state, rng_state,
                                   save_trainer_state, set_rng_state)
from rlhf.config import read_yaml, save_config, to_dict
from rlhf.errors import ConfigError

__all__ = ["CheckpointError", "check_same_config", "describe_os_error", "latest_checkpoint", "load_trainer_state",
           "recover_leftovers", "resolve_resume", "rng_state", "save_checkpoint", "save_trainer_state",
           "set_rng_state", "verify_checkpoint"]

log = logging.getLogger("rlhf.checkpoint")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
CONFIG = "config.yaml"
MANIFEST_FORMAT = 1
# fields that may change between a run and its resumption: bookkeeping, and the memory knobs a
# user lowers to get past an out-of-memory (the same update, summed in another order)
RESUME_FREE_FIELDS = {"resume", "overwrite", "out_dir", "device", "log_every", "checkpoint_every", "keep_last",
                      "micro_batch_size", "gradient_checkpointing", "auto_halve_micro_batch"}
# dotted fields a resume may change, logged at WARNING as a change: they steer the steps still to come
# and leave what was trained so far as it is (the non-finite guard's advice is to lower the rate).
# Everything else (data, model, seeds, epochs/iterations, batch sizes, the loss) makes another run.
RESUME_ADJUSTABLE_FIELDS = {"optim.lr", "optim.max_grad_norm", "max_nonfinite_in_a_row", "eval_every"}

_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def describe_os_error(err: BaseException, path: str | os.PathLike) -> str:
    """"<path>: <cause>" in one line for an OSError (or a safetensors write error, which carries the
    OS error only in its text), e.g. "/runs/a/checkpoints/.tmp-step-00000010: no space left on device"."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    text = (str(err).splitlines() or [type(err).__name__])[0]
    cause = _CAUSES.get(code) or (os.strerror(code).lower() if code else text)
    return f"{getattr(err, 'filename', None) or path}: {cause}"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    try:
        return int(name[len(prefix):])
    except ValueError:
        return None


def _marked_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """`step-N` dirs holding the marker, oldest first (not yet verified)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(_step_of(path.name, "step-"), path) for path in root.iterdir()]
    return sorted((step, path) for step, path in found if step is not None and (path / MARKER).is_file())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of `run_dir` that holds the marker, or None. Not verified: resuming
    goes through `resolve_resume`, which checks the manifest and falls back when it fails."""
    found = _marked_steps(Path(run_dir))
    return found[-1][1] if found else None


# ---- manifest and verification --------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    """Every file under `directory` but the marker, by its POSIX path relative to `directory`."""
    files = {path.relative_to(directory).as_posix(): path for path in directory.rglob("*") if path.is_file()}
    files.pop(MARKER, None)
    return files


def _manifest(directory: Path, step: int) -> dict[str, Any]:
    files = {name: {"size": path.stat().st_size, "sha256": _sha256(path)}
             for name, path in sorted(_files(directory).items())}
    return {"format": MANIFEST_FORMAT, "step": step, "files": files}


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (one line, no path), or None if it can.

    Covers everything a resumption reads: each file against its manifest (missing, truncated or
    altered files, files that were never saved), the trainer state's structure, its RNG streams,
    and config.yaml."""
    path = Path(path)
    try:
        manifest = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MARKER} marker"
    except (OSError, ValueError) as err:
        return f"unreadable {MARKER} marker ({type(err).__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        if (path / PICKLED_FILE).is_file():
            return PICKLED_REFUSAL
        return (f"its {MARKER} marker holds no manifest (written by an older version or by hand), "
                "so it cannot be verified")
    step = _step_of(path.name, "step-")
    if step is not None and manifest.get("step") != step:
        return f"its manifest is for step {manifest.get('step')!r}, not {path.name}"
    on_disk = _files(path)
    for name, expected in sorted(manifest["files"].items()):
        if name not in on_disk:
            return f"{name} is missing"
        if not isinstance(expected, dict):
            return f"its manifest entry for {name} is garbled"
        try:
            if on_disk[name].stat().st_size != expected.get("size"):
                return f"{name} has {on_disk[name].stat().st_size} bytes, the manifest says {expected.get('size')}"
            if _sha256(on_disk[name]) != expected.get("sha256"):
                return f"{name} does not match its checksum (corrupted or changed after the save)"
        except OSError as err:
            return f"{name} unreadable ({describe_os_error(err, name)})"
    extra = sorted(set(on_disk) - set(manifest["files"]))
    if extra:
        return f"{extra[0]} was not part of the save ({len(extra)} unlisted files)"
    if (path / STRUCTURE_FILE).is_file():
        try:
            state = load_trainer_state(path)
        except CheckpointError as err:
            return str(err).split(": ", 1)[-1]
        if "rng" in state:
            problem = check_rng_state(state["rng"])
            if problem:
                return f"its RNG state cannot be restored ({problem})"
    if (path / CONFIG).is_file():
        try:
            read_yaml(path / CONFIG)
        except ConfigError as err:
            return f"unreadable {CONFIG} ({str(err).splitlines()[0]})"
    return None


# ---- saving --------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | os.PathLike, step: int, write: Callable[[Path], None],
                    keep_last: int = 2, config: Any = None) -> Path:
    """Call `write(tmp_dir)` to fill a checkpoint, then publish it atomically as `step-<step>`.

    `config` (the run's resolved config dataclass) is saved beside the state, so a resumption can
    check that it continues the same run (`resolve_resume`). An OS error (full disk, read-only or
    forbidden directory) raises CheckpointError naming the path and the cause; the temporary
    directory is removed and the checkpoints already saved are untouched."""
    root = Path(run_dir) / CHECKPOINTS
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        recover_leftovers(root)
        tmp.mkdir()
        write(tmp)
        if config is not None:
            save_config(config, tmp / CONFIG)
        manifest = _manifest(tmp, step)
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last: the proof of the rest
        _fsync_tree(tmp)
        _publish(tmp, final)
        _fsync_dir(root)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint step {step} not saved: {describe_os_error(err, tmp)}; "
                              "the checkpoints saved before it are untouched") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _prune(root, final, keep_last)
    except OSError as err:  # the new checkpoint is safe; an old one staying on disk is no reason to stop
        log.warning("could not remove an old checkpoint: %s", describe_os_error(err, root))
    log.info("checkpoint saved: %s", final)
    return final


def _publish(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    # the same step saved twice (the guard's stop path re-saves the last step): newest wins. A kill
    # between the two renames leaves both copies under .tmp-* names; recover_leftovers publishes one
    old = final.parent / f".tmp-old-{final.name[len('step-'):]}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)  # put the previous copy back before reporting
        raise
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints, never `keep` (the one just saved)."""
    others = [path for _, path in _marked_steps(root.parent) if path != keep]
    for path in others[:max(len(others) - (keep_last - 1), 0)] if keep_last > 0 else []:
        # the marker first: a kill mid-removal leaves a dir that no one takes for complete
        (path / MARKER).unlink()
        _fsync_dir(path)
        shutil.rmtree(path)


def recover_leftovers(root: Path) -> list[str]:
    """Tidy `checkpoints/` after a kill; returns the names removed.

    A kill inside a re-save leaves the step's copies as `.tmp-step-N` (new, complete once its marker
    is there) and `.tmp-old-N` with no `step-N`: the newest copy that verifies becomes `step-N` again.
    Everything else is debris of an interrupted save or prune and is removed: other `.tmp-*` dirs,
    and `step-N` dirs without a marker (a prune removes the marker first)."""
    removed = []
    # .tmp-step before .tmp-old: the newer copy of a step wins when both verify
    for path in sorted(root.iterdir(), key=lambda p: (not p.name.startswith(".tmp-step-"), p.name)):
        step = _step_of(path.name, ".tmp-step-")
        step = _step_of(path.name, ".tmp-old-") if step is None else step
        if step is not None:
            final = root / f"step-{step:08d}"
            if not (final / MARKER).is_file() and verify_checkpoint(path) is None:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(path, final)
                log.warning("recovered %s from %s (a save of that step was interrupted)", final, path.name)
                continue
        if path.name.startswith(".tmp-") or (path.is_dir() and path.name.startswith("step-")
                                              and not (path / MARKER).is_file()):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    if removed:
        log.info("removed leftovers of interrupted checkpoint saves/prunes in %s: %s", root, ", ".join(removed))
    return removed


# ---- resuming -------------------------------------------------------------------------------

def resolve_resume(run_dir: str | os.PathLike, resume: str, config: Any = None) -> Path | None:
    """`resume`: "" (start fresh), "auto" (newest checkpoint that verifies, if any) or a checkpoint path.

    With `config`, a checkpoint saved under a different config is refused: the resumed run would
    silently be a different run (another schedule, data order or loss) while claiming to continue it.
    """
    if not resume:
        return None
    if resume == "auto":
        path = _newest_verified(Path(run_dir))
        if path is None:
            return None
    else:
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint directory (no {MARKER} marker)")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"resume: checkpoint {path} cannot be used: {problem}")
    if config is not None:
        check_same_config(path, config)
    return path


def _newest_verified(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS
    try:
        leftovers = recover_leftovers(root) if root.is_dir() else []
    except OSError as err:
        raise CheckpointError(f"resume=auto: cannot tidy {root}: {describe_os_error(err, root)}") from None
    candidates = _marked_steps(run_dir)
    failed: list[tuple[Path, str]] = []
    for _, path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            if failed:
                log.warning("resume=auto: resuming from %s, the newest checkpoint that verifies", path)
                _set_aside(failed)
            return path
        log.warning("resume=auto: checkpoint %s cannot be used: %s", path, problem)
        failed.append((path, problem))
    if failed:
        newest, problem = failed[0]
        raise CheckpointError(
            f"resume=auto: none of the {len(failed)} checkpoints in {root} can be used (newest, {newest.name}: "
            f"{problem}); {HOW_TO_RESTART}")
    if leftovers:
        log.warning("resume=auto: no complete checkpoint in %s, only leftovers of interrupted saves (%s), "
                    "removed; starting fresh", root, ", ".join(leftovers))
    else:
        log.info("resume=auto: no complete checkpoint in %s, starting fresh", run_dir)
    return None


def _set_aside(failed: list[tuple[Path, str]]) -> None:
    """Rename checkpoints that failed verification to `rejected-step-N`: kept for a look, but no
    longer counted as checkpoints (a later prune would otherwise keep them and drop good ones)."""
    for path, _ in failed:
        target = path.with_name("rejected-" + path.name)
        suffix = 1
        while target.exists():
            target, suffix = path.with_name(f"rejected-{path.name}.{suffix}"), suffix + 1
        try:
            os.rename(path, target)
            log.warning("set %s aside as %s", path.name, target.name)
        except OSError as err:
            raise CheckpointError(
                f"resume=auto: cannot set aside a bad checkpoint: {describe_os_error(err, path)}") from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_changes(saved: dict[str, Any], config: Any) -> tuple[list[str], list[str]]:
    """Compare a saved config (a dict read from config.yaml) with `config`. -> (refused, adjusted): the
    differing fields as "field: old -> new", those that make another run and those a resume may change."""
    flat_saved, flat_current = _flatten(saved), _flatten(to_dict(config))
    refused, adjusted = [], []
    for key in sorted(set(flat_saved) | set(flat_current)):
        old, new = flat_saved.get(key), flat_current.get(key)
        if key.split(".")[-1] in RESUME_FREE_FIELDS or old == new:
            continue
        (adjusted if key in RESUME_ADJUSTABLE_FIELDS else refused).append(f"{key}: {old!r} -> {new!r}")
    return refused, adjusted


def check_same_config(checkpoint: Path, config: Any) -> None:
    """Raise ConfigError naming every field whose value differs from the one `checkpoint` was saved with,
    except those a resume may change (`RESUME_ADJUSTABLE_FIELDS`), which are logged at WARNING."""
    saved_file = checkpoint / CONFIG
    if not saved_file.is_file():
        log.warning("%s has no %s: cannot check that the resumed run uses the same config", checkpoint, CONFIG)
        return
    try:
        saved_tree = read_yaml(saved_file)
    except (ConfigError, OSError) as err:  # verify_checkpoint reads it first; this guards other callers
        raise CheckpointError(f"resume: {saved_file} is unreadable ({str(err).splitlines()[0]})") from None
    refused, adjusted = config_changes(saved_tree, config)
    if refused:
        raise ConfigError(f"resume: the config differs from the one {checkpoint} was saved with ("
                          + "; ".join(refused) + "). Resume with the same values, or start over "
                          "(another --out, or --overwrite)")
    for change in adjusted:
        log.warning("resume: %s changed (%s); the steps already taken stay as they were", change.split(":")[0],
                    change)

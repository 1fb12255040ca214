"""The trainer state of a checkpoint, stored without pickles: tensors in safetensors, the rest in JSON.

A stage's state is a nested tree (the optimizer's and scheduler's `state_dict()`, RNG states,
counters). `torch.save` would pickle it, and unpickling a file someone else could write runs their
code as the user who resumes. Here the tree's leaves that are tensors or numpy arrays go to
`trainer_state.safetensors` (a flat name -> tensor file that cannot hold code), and its shape goes
to `trainer_state.json`, where what JSON cannot say is tagged so it comes back as it went in:

    {"__dict__": [[0, ...], ...]}      a dict with a key that is not a str (optimizer state: param ids)
    {"__tuple__": [...]}               a tuple (python's RNG state, Adam's betas)
    {"__tensor__": "t3"}               a tensor, by name in the safetensors file (loaded on the CPU)
    {"__ndarray__": "t4", "dtype": "<u4", "shape": [624]}   a numpy array, its raw bytes as a uint8 tensor
    {"__float__": "nan"}               a non-finite float (strict JSON has none)

Every value comes back bitwise equal: floats are written with `repr` (exact), tensors and arrays as
their bytes. Loading reads JSON and safetensors only, so it never executes anything from the files.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from rlhf.errors import RLHFError

TENSORS_FILE = "trainer_state.safetensors"
STRUCTURE_FILE = "trainer_state.json"
PICKLED_FILE = "trainer_state.pt"  # what versions before the no-pickle format wrote
_TAGS = ("__dict__", "__tuple__", "__tensor__", "__ndarray__", "__float__")


class CheckpointError(RLHFError):
    """A checkpoint cannot be used: corrupted, incomplete, or in a format we refuse to load."""


PICKLED_REFUSAL = (f"{PICKLED_FILE} was written by an older version of rlhf-lean as a pickle; not loaded, "
                   "because unpickling a file runs any code it holds")
HOW_TO_RESTART = "start the run again into another --out (or move the checkpoints away)"


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """Write `state` as `trainer_state.json` + `trainer_state.safetensors` in `directory`.

    Raises TypeError for a leaf that has no faithful encoding (an object, a lambda): a bug of the
    stage that put it there, caught at the first checkpoint rather than at the resume."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    # bytes first, then an ordinary write: a full disk then raises OSError with its errno
    payload = save(tensors, metadata={"format": "pt"})
    _write_bytes(directory / TENSORS_FILE, payload)
    _write_bytes(directory / STRUCTURE_FILE, json.dumps(structure, allow_nan=False).encode("utf-8"))


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """The state `save_trainer_state` wrote, tensors on the CPU; CheckpointError (one line) if unreadable."""
    directory = Path(directory)
    if not (directory / STRUCTURE_FILE).is_file() and (directory / PICKLED_FILE).is_file():
        raise CheckpointError(f"{directory}: {PICKLED_REFUSAL}; {HOW_TO_RESTART}")
    try:
        structure = json.loads((directory / STRUCTURE_FILE).read_bytes().decode("utf-8"),
                               parse_constant=_refuse_constant)
        tensors = load((directory / TENSORS_FILE).read_bytes())
        state = _decode(structure, tensors, "state")
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory}: trainer state file missing ({Path(err.filename).name})") from None
    except (OSError, ValueError, SafetensorError, _BadState, RecursionError) as err:
        # ValueError covers JSONDecodeError and UnicodeDecodeError
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{directory}: unreadable trainer state ({cause})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory}: unreadable trainer state (top level is not a mapping)")
    return state


def rng_state() -> dict[str, Any]:
    """Every random stream a run draws from, so a resumed run draws the same numbers."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_state(state: Any) -> str | None:
    """Why `set_rng_state(state)` would fail, or None. Tried for real, then the current streams are put back."""
    current = rng_state()
    try:
        set_rng_state(state)
    except Exception as err:  # random/numpy/torch raise TypeError, ValueError, KeyError, RuntimeError
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        set_rng_state(current)
    return None


# ---- the encoding ---------------------------------------------------------------------------

class _BadState(ValueError):
    """The JSON does not describe a state we wrote (unknown tag, missing tensor, wrong shape)."""


def _write_bytes(path: Path, payload: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(payload)


def _refuse_constant(name: str) -> float:
    raise _BadState(f"bare {name} in JSON (we write non-finite floats tagged)")


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # a copy of its own: safetensors refuses tensors that share memory, and the GPU's stay put
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"trainer state {where}: a numpy array of Python objects cannot be stored")
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": name, "dtype": array.dtype.str, "shape": list(array.shape),
                "scalar": isinstance(value, np.generic)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(key, str) and not key.startswith("__") for key in value)
        if plain:
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        pairs = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"trainer state {where}: dict key {key!r} is not a str or an int")
            pairs.append([key, _encode(item, tensors, f"{where}.{key}")])
        return {"__dict__": pairs}
    raise TypeError(f"trainer state {where}: cannot store a {type(value).__name__} without pickling it")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, list):
        return [_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise _BadState(f"{where}: unexpected {type(value).__name__}")
    tag = next((key for key in value if key in _TAGS), None)
    if tag is None:
        return {key: _decode(item, tensors, f"{where}.{key}") for key, item in value.items()}
    body = value[tag]
    if tag == "__float__":
        if body not in ("nan", "inf", "-inf"):
            raise _BadState(f"{where}: bad float {body!r}")
        return float(body)
    if tag == "__tuple__" and isinstance(body, list):
        return tuple(_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(body))
    if tag == "__dict__" and isinstance(body, list):
        if not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int)) for pair in body):
            raise _BadState(f"{where}: bad dict entries")
        return {key: _decode(item, tensors, f"{where}.{key}") for key, item in body}
    if tag in ("__tensor__", "__ndarray__") and isinstance(body, str) and body in tensors:
        if tag == "__tensor__":
            return tensors[body]
        try:
            dtype = np.dtype(value["dtype"])
            if dtype.hasobject:
                raise TypeError("object dtype")
            array = np.frombuffer(tensors[body].numpy().tobytes(), dtype=dtype).reshape(value["shape"]).copy()
        except (KeyError, TypeError, ValueError) as err:
            raise _BadState(f"{where}: bad array ({err})") from None
        return array[()] if value.get("scalar") else array
    raise _BadState(f"{where}: bad {tag} entry")

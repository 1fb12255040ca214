"""Data parallelism over N processes: every stage's distributed plumbing, in one place.

    accelerate launch --multi_gpu --num_processes N -m rlhf <stage> ...     (GPUs: NCCL; CPU: gloo)
    torchrun --nproc_per_node N -m rlhf <stage> ...                          (the same, without accelerate)

When the process was not launched that way (no WORLD_SIZE > 1 in the environment) every function here
is a no-op that returns its input untouched, so a single-process run is bitwise what it was before.

How: accelerate's `PartialState` sets up the process group (it picks NCCL or gloo and reads the
launcher's environment); each process loads the frozen base once, on its own device, and holds every
role. Only the trainable parameters' gradients (the adapters and heads, `RoleModel.parameters(role)`)
are summed across processes, one flat all-reduce before gradient clipping (`all_reduce_grads`).
Why not wrap the model in `DistributedDataParallel`: a `RoleModel` switches its active LoRA adapter
per call (policy, value, reference, reward over one base, several roles in one forward); DDP's
reducer expects one module whose forward touches a fixed set of parameters per backward, and its
hooks would fire for roles that are frozen in this step or not at all (`find_unused_parameters`
costs a graph walk per step and still mis-handles a role used twice in one forward). An explicit
all-reduce of the few MB of LoRA gradients after the backward is the same arithmetic, has no such
coupling, and works with gradient accumulation for free (it runs once per optimiser step).

Exactness: each process gets an equal contiguous shard of every global batch (`shard`), and each stage
normalises its loss by the *global* denominator (SFT: the answer tokens of the whole batch, all-reduced;
RM: the global number of micro-batches), so the summed gradient is the one-process gradient. Every
decision that must agree across processes (skip a non-finite step, halve the micro-batch after an
out-of-memory) is taken on all-reduced values.

Failure: every collective runs under the process group's timeout (`RLHF_DISTRIBUTED_TIMEOUT_S`,
default 600 s); a dead or stuck peer turns into an `RLHFError` naming this rank, and `--resume auto`
continues from the newest checkpoint (written by rank 0 only, with every rank's random state).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as tdist

from rlhf.errors import ConfigError, RLHFError

log = logging.getLogger("rlhf.distributed")

TIMEOUT_ENV = "RLHF_DISTRIBUTED_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # ours: a GPU rollout step is seconds; ten minutes of silence means a dead peer


def launched() -> bool:
    """True when a launcher (accelerate, torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw}")
    return value


def init() -> None:
    """Join the process group when launched as one of several processes (idempotent; else nothing)."""
    if not launched() or (tdist.is_available() and tdist.is_initialized()):
        return
    from accelerate import PartialState  # imported only when distributed: the single-process path never needs it

    seconds = timeout_s()
    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=seconds))
    log.info("rank %d of %d joined the process group (%s, timeout %.0f s)", rank(), world_size(),
             tdist.get_backend(), seconds)
    if rank() > 0:  # one progress line per step, rank 0's, not N copies of it
        logging.getLogger("rlhf.progress").setLevel(logging.WARNING)


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 writes the run dir (config, metrics, checkpoints, role dirs, DONE) and shows progress."""
    return rank() == 0


def place(device: torch.device) -> torch.device:
    """Each process on its own GPU (cuda:LOCAL_RANK); CPU stays CPU."""
    if not active() or device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank() % max(torch.cuda.device_count(), 1)))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run a collective; a peer that died or went silent past the timeout becomes an error naming this rank."""
    try:
        return fn()
    except (RuntimeError, ValueError) as err:  # gloo/NCCL report a lost peer or a timeout as RuntimeError
        raise RLHFError(
            f"rank {rank()} of {world_size()}: {what} failed: another process stopped or did not answer within "
            f"{timeout_s():.0f} s ({TIMEOUT_ENV}); this process stops too. Rerun the same launch command with "
            f"--resume auto to continue from the newest checkpoint. ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from err


# ---------------------------------------------------------------------------------------------- data
def shard(rows: Sequence[Any], what: str) -> list[Any]:
    """This process's contiguous share of one global batch; the batch must split evenly, so that every
    process runs the same number of micro-batches and the global batch size means what the config says."""
    n = world_size()
    if n == 1:
        return list(rows)
    if len(rows) % n:
        raise ConfigError(f"{what}={len(rows)} must be divisible by the number of processes ({n}) so that each "
                          f"process gets an equal share; choose a multiple of {n}")
    per = len(rows) // n
    return list(rows[rank() * per:(rank() + 1) * per])


def shard_rows(*tensors: torch.Tensor, what: str = "rollout.batch_size") -> tuple[torch.Tensor, ...]:
    """This process's contiguous share of the rows (dim 0) of each tensor; one process: the tensors."""
    if world_size() == 1:
        return tensors
    rows = shard(range(tensors[0].shape[0]), what)
    return tuple(t[rows[0]:rows[-1] + 1] for t in tensors)


def mine(index: int) -> bool:
    """Whether work item `index` (a micro-batch of an optimiser step) runs on this process: dealt round-robin,
    so the N processes together run exactly the items one process runs, each with the same rows."""
    return index % world_size() == rank()


def eval_share(items: Sequence[Any]) -> Sequence[Any]:
    """This process's share of an evaluation set: a contiguous slice (uneven by at most one item; evaluation
    sums are reduced once at the end), so gathering the shares in rank order gives back the set's order.
    One process: `items` itself."""
    n, r = world_size(), rank()
    return items if n == 1 else items[r * len(items) // n:(r + 1) * len(items) // n]


def rank_seed(seed: int) -> int:
    """A seed of this process's own random stream (sampling, dropout): rank 0 keeps `seed`, so one process
    draws what it always drew; rank r > 0 gets a distinct, reproducible stream."""
    return seed if rank() == 0 else seed + 1_000_003 * rank()


# ------------------------------------------------------------------------------------- reductions
def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes of `tensor` (in place; returned). One process: `tensor` itself."""
    if active():
        _collective("all_reduce", lambda: tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM))
    return tensor


def all_max(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        _collective("all_reduce(max)", lambda: tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX))
    return tensor


def all_sums(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Several sums in one all-reduce (fp32 on the first tensor's device). One process: the tensors as given."""
    if not active():
        return list(tensors)
    flat = torch.stack([t.detach().float().reshape(()) for t in tensors])  # [n]
    all_sum(flat)
    return list(flat.unbind())


def any_true(flag: bool, device: torch.device | None = None) -> bool:
    """Whether `flag` is set on any process (an out-of-memory on one rank halves the micro-batch on all)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or _comm_device())
    return bool(all_max(t).item())


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over processes, in one flat buffer (a missing gradient counts as 0).
    Each process's loss carries the global normalisation, so the sum is the one-process gradient."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # [sum of numel]
    all_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_params(params: Sequence[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` (and any buffers given) to every process: the same start."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            _collective("broadcast", lambda p=p: tdist.broadcast(p.data, src=0))


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------------------- objects
def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (one process: [obj])."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective("all_gather_object", lambda: tdist.all_gather_object(out, obj))
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not active():
        return obj
    box = [obj]
    _collective("broadcast_object", lambda: tdist.broadcast_object_list(box, src=0))
    return box[0]


def gather_rows(tensor: torch.Tensor, pad_value: float | int | bool = 0) -> torch.Tensor:
    """Every process's rows of `tensor` ([b, ...], the same b everywhere) stacked in rank order -> [N * b, ...];
    dim 1 is right-padded with `pad_value` to the longest (answers end at different lengths per process).
    One process: `tensor` itself."""
    if not active():
        return tensor
    device = _comm_device()
    local = tensor.to(device)
    if local.dim() > 1:
        longest = int(all_max(torch.tensor([local.shape[1]], device=device)).item())
        if longest > local.shape[1]:
            pad = local.new_full((local.shape[0], longest - local.shape[1], *local.shape[2:]), pad_value)
            local = torch.cat([local, pad], dim=1)
    wire = local.to(torch.uint8) if local.dtype == torch.bool else local  # gloo has no bool collectives
    parts = [torch.empty_like(wire) for _ in range(world_size())]
    _collective("all_gather", lambda: tdist.all_gather(parts, wire.contiguous()))
    return torch.cat(parts).to(device=tensor.device, dtype=tensor.dtype)


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0, in rank order (shapes may differ; small tensors:
    scores, not activations). One process: `tensor` itself."""
    if not active():
        return tensor
    parts = gather_objects(tensor.detach().cpu())
    return torch.cat(parts).to(tensor.device)


def barrier() -> None:
    """Wait until every process gets here (after rank 0 wrote files the others read next)."""
    if active():
        _collective("barrier", lambda: tdist.barrier())


def on_main(fn: Callable[[], Any], what: str) -> Any:
    """Run `fn` on rank 0 only and hand its result (or its error) to every process.

    Rank 0's error is re-raised there as is; the others raise an RLHFError that quotes it, so every
    process stops instead of waiting for a collective rank 0 never joins."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001  (handed to the others, then re-raised)
            error = err
    shared = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RLHFError(f"rank {rank()} of {world_size()}: {what} failed on rank 0: {shared[1]}")
    return shared[0]


def check_same_world_size(saved: int, where: str) -> None:
    """A checkpoint taken with N processes resumes only with N: each rank's random stream and its shard
    of the data are tied to N."""
    if saved != world_size():
        raise ConfigError(f"{where} was written by a run on {saved} process(es); this launch has {world_size()}. "
                          f"Resume with --num_processes {saved}, or start over (another --out, or --overwrite)")

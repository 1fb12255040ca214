"""How fast, and in how much memory, do rlhf_kernels compute the RL step's per-token math, against
the way practitioners compute it today?

Ops (bf16 on GPU, fp32 on CPU):
- logprobs:  token_logprobs(logits [N, V], labels)                       (rollout scoring)
- ppo:       ppo_policy_loss(logits [N, V], ...)                         (the PPO update)
- fused_ppo: fused_linear_ppo_loss(hidden [N, H], weight [V, H], ...)    (the PPO update from hidden)
Modes: "fwd" runs under torch.no_grad() (scoring); "fwd+bwd" is a training step.
Providers:
- ours:           the public function (Triton on GPU; on CPU its torch path, the chunked reference)
- torch:          the naive reference the tests use (log_softmax + gather, then ratio, clip and
                  mean as separate ops): `rlhf_kernels.reference.*_naive`
- torch.compile:  torch.compile of that naive reference (GPU only)
- matmul + ours:  fused_ppo only: logits = hidden @ weight^T materialised, then ours on them
- matmuls:        fused_ppo fwd+bwd only: the three bare LM-head GEMMs, the floor to compare with
Measurements: median ms with p20 / p80; peak extra memory over what the inputs already hold;
achieved GB/s for the logits ops counted as the minimum traffic (fwd: read the logits once;
fwd+bwd: read them once and write their gradient once), with % of the device's peak bandwidth.
- GPU: triton.testing.do_bench (L2 flushed between runs), torch.cuda.reset_peak_memory_stats +
  max_memory_allocated.
- CPU: time.perf_counter over repeats; peak memory = the process's peak resident set (VmHWM, reset
  through /proc/self/clear_refs before each run) minus its resident set before the run, with
  glibc's mmap threshold fixed at 64 KiB (mallopt) so that freed tensors leave the resident set.
Usage (from the repository root; `benchmarks` is a package):
  python -m benchmarks.kernel_bench --smoke                  # tiny sizes, seconds, any machine
  python -m benchmarks.kernel_bench                          # GPU: the full grid; CPU: N=2048 V=32000 H=512
  python -m benchmarks.kernel_bench --n 8192 --v 151936      # one point of the grid
Prints a table with ratio columns (x faster, x less memory than the torch provider) and writes JSON
with the device, torch/triton versions, git commit and date.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT, environment, fix_malloc_threshold, median_p20_p80, proc_status_bytes
from rlhf_kernels import fused_linear_ppo_loss, ppo_policy_loss, reference, token_logprobs
# Peak HBM bandwidth by device name (vendor datasheets), for the "% of peak" column.
PEAK_GBS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}
GPU_GRID_N = (2048, 8192, 32768)
GPU_GRID_V = (32000, 128256, 151936)  # Llama 2, Llama 3, Qwen2 vocabularies
GPU_H = 4096


# ---------------------------------------------------------------------------------------------
# Inputs and providers
# ---------------------------------------------------------------------------------------------


def make_inputs(N, V, H, dtype, device, op):
    # generated on the device: a [32768, 151936] fp32 randn on the host would take longer than the op
    g = torch.Generator(device=device).manual_seed(0)
    inputs = {
        "labels": torch.randint(0, V, (N,), generator=g, device=device),  # [N]
        "mask": torch.rand(N, generator=g, device=device) > 0.1,  # [N], 10% padding
        # old log-probs near what random logits give (log-ratios of a few tenths: some clipped)
        "old_logp": -math.log(V) - 2 + 0.3 * torch.randn(N, generator=g, device=device),  # [N]
        "advantages": torch.randn(N, generator=g, device=device),  # [N]
    }
    if op == "fused_ppo":
        inputs["hidden"] = torch.randn(N, H, generator=g, device=device, dtype=dtype)  # [N, H]
        inputs["weight"] = torch.randn(V, H, generator=g, device=device, dtype=dtype) / H**0.5  # [V, H]
    else:
        inputs["logits"] = 2 * torch.randn(N, V, generator=g, device=device, dtype=dtype)  # [N, V]
    return inputs


def providers(op, mode, on_gpu):
    """name -> fn(inputs) running the op once (its backward too in fwd+bwd)."""
    naive_ppo = reference.ppo_policy_loss_naive
    # ours on CPU is the chunked torch reference, even if TRITON_INTERPRET=1 happens to be set
    backend = None if on_gpu else "torch"

    def ppo_args(x):
        return (x["labels"], x["old_logp"], x["advantages"], x["mask"])

    if op == "logprobs":
        table = {"ours": lambda x: token_logprobs(x["logits"], x["labels"], backend=backend),
                 "torch": lambda x: reference.token_logprobs_naive(x["logits"], x["labels"])}
        if on_gpu:
            compiled = torch.compile(reference.token_logprobs_naive, dynamic=True)
            table["torch.compile"] = lambda x: compiled(x["logits"], x["labels"])
        reduce = lambda out: out.sum()  # noqa: E731
    elif op == "ppo":
        table = {"ours": lambda x: ppo_policy_loss(x["logits"], *ppo_args(x), backend=backend)[0],
                 "torch": lambda x: naive_ppo(x["logits"], *ppo_args(x))[0]}
        if on_gpu:
            compiled = torch.compile(naive_ppo, dynamic=True)
            table["torch.compile"] = lambda x: compiled(x["logits"], *ppo_args(x))[0]
        reduce = lambda out: out  # noqa: E731
    else:
        table = {"ours": lambda x: fused_linear_ppo_loss(x["hidden"], x["weight"], *ppo_args(x), backend=backend)[0],
                 "matmul + ours": lambda x: ppo_policy_loss(x["hidden"] @ x["weight"].T, *ppo_args(x),
                                                            backend=backend)[0],
                 "torch": lambda x: naive_ppo(x["hidden"] @ x["weight"].T, *ppo_args(x))[0]}
        reduce = lambda out: out  # noqa: E731
        if mode == "fwd+bwd":
            table["matmuls"] = bare_matmuls
    if mode == "fwd":
        return {name: _no_grad(fn) for name, fn in table.items()}
    return {name: (fn if name == "matmuls" else _with_backward(fn, reduce)) for name, fn in table.items()}


def bare_matmuls(x):
    """The LM head's three GEMMs of a training step: logits, d hidden, d weight."""
    logits = x["hidden"] @ x["weight"].T  # [N, V]
    logits @ x["weight"]  # [N, H], stands in for d hidden = d logits @ W
    logits.T @ x["hidden"]  # [V, H], stands in for d W = d logits^T @ hidden


def _no_grad(fn):
    def run(x):
        with torch.no_grad():
            fn(x)

    return run


def _with_backward(fn, reduce):
    def run(x):
        reduce(fn(x)).backward()

    return run


def grad_leaves(x, op):
    return [x["hidden"]] if op == "fused_ppo" else [x["logits"]]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def measure_cpu(fn, x, leaves, repeats):
    """-> (median, p20, p80 in ms, peak extra MiB). Peak: VmHWM after a clear_refs reset, minus
    the resident set before the run."""

    def once():
        for t in leaves:
            t.grad = None
        fn(x)

    once()  # warm-up
    for t in leaves:
        t.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = proc_status_bytes("VmRSS")
    fn(x)
    peak_mib = (proc_status_bytes("VmHWM") - before) / 2**20
    times = []
    for _ in range(repeats):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return (*median_p20_p80(times), peak_mib)


def measure_gpu(fn, x, leaves):
    import triton.testing

    for t in leaves:
        t.grad = None
    fn(x)  # warm-up (and compile)
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    for t in leaves:
        t.grad = None
    median, p20, p80 = triton.testing.do_bench(lambda: fn(x), quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)
    return median, p20, p80, peak_mib


def minimum_bytes(op, mode, N, V, dtype):
    """The traffic no implementation can avoid for the logits ops; None for fused_ppo (GEMM-bound)."""
    if op == "fused_ppo":
        return None
    logits_bytes = N * V * torch.finfo(dtype).bits // 8
    return logits_bytes if mode == "fwd" else 2 * logits_bytes


def run_case(op, mode, N, V, H, dtype, device, repeats, peak_gbs):
    on_gpu = device.type == "cuda"
    rows = []
    for name, fn in providers(op, mode, on_gpu).items():
        row = {"op": op, "mode": mode, "N": N, "V": V, "H": H if op == "fused_ppo" else None,
               "dtype": str(dtype).replace("torch.", ""), "provider": name}
        x = make_inputs(N, V, H, dtype, device, op)
        leaves = grad_leaves(x, op) if mode == "fwd+bwd" and name != "matmuls" else []
        for t in leaves:
            t.requires_grad_(True)
        try:
            if on_gpu:
                median, p20, p80, peak = measure_gpu(fn, x, leaves)
            else:
                median, p20, p80, peak = measure_cpu(fn, x, leaves, repeats)
            row.update(ms=median, p20_ms=p20, p80_ms=p80, peak_mib=peak)
            moved = minimum_bytes(op, mode, N, V, dtype)
            if moved is not None:
                row["gb_per_s"] = moved / (median * 1e-3) / 1e9
                if peak_gbs:
                    row["pct_of_peak_bw"] = 100 * row["gb_per_s"] / peak_gbs
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as err:  # a provider that cannot run here (e.g. no compiler) is recorded
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        del x, leaves
        if on_gpu:
            torch.cuda.empty_cache()
        rows.append(row)
    baseline = next((r for r in rows if r["provider"] == "torch" and "ms" in r), None)
    for r in rows:
        if baseline and "ms" in r:
            r["x_faster_than_torch"] = baseline["ms"] / r["ms"]
            r["x_less_memory_than_torch"] = baseline["peak_mib"] / r["peak_mib"] if r["peak_mib"] > 0 else None
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def print_table(rows):
    header = (f"{'op':<10}{'mode':<9}{'N':>7}{'V':>8} {'provider':<15}{'ms':>10}{'p20-p80':>18}{'peak MiB':>10}"
              f"{'GB/s':>8}{'%peak':>7}{'x faster':>10}{'x less mem':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<10}{r['mode']:<9}{r['N']:>7}{r['V']:>8} {r['provider']:<15}{r['error']}")
            continue
        fmt = lambda key, spec: format(r[key], spec) if r.get(key) is not None else "-"  # noqa: E731
        spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        print(f"{r['op']:<10}{r['mode']:<9}{r['N']:>7}{r['V']:>8} {r['provider']:<15}{r['ms']:>10.3f}{spread:>18}"
              f"{r['peak_mib']:>10.1f}{fmt('gb_per_s', '.0f'):>8}{fmt('pct_of_peak_bw', '.0f'):>7}"
              f"{fmt('x_faster_than_torch', '.2f'):>10}{fmt('x_less_memory_than_torch', '.2f'):>11}")


def peak_bandwidth(device_name, override):
    if override:
        return override
    for key, gbs in PEAK_GBS.items():  # most specific names first
        if key in device_name:
            return gbs
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", help="token counts (default: GPU grid, or 2048 on CPU)")
    parser.add_argument("--v", type=int, nargs="+", help="vocab sizes (default: GPU grid, or 32000 on CPU)")
    parser.add_argument("--h", type=int, help=f"hidden size for fused_ppo (default {GPU_H} on GPU, 512 on CPU)")
    parser.add_argument("--ops", nargs="+", default=["logprobs", "ppo", "fused_ppo"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case on CPU")
    parser.add_argument("--peak-gbs", type=float, help="device peak bandwidth in GB/s (default by device name)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/kernels-<device>[-smoke].json)")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        fix_malloc_threshold()
    if args.smoke:
        grid_n, grid_v, H = args.n or [64], args.v or [1000], args.h or 64
    elif on_gpu:
        grid_n, grid_v, H = args.n or GPU_GRID_N, args.v or GPU_GRID_V, args.h or GPU_H
    else:
        grid_n, grid_v, H = args.n or [2048], args.v or [32000], args.h or 512
    dtype = torch.bfloat16 if on_gpu else torch.float32  # CPUs have no fast bf16 path to measure
    env = environment(device)
    peak_gbs = peak_bandwidth(env["device"], args.peak_gbs) if on_gpu else None
    rows = []
    for op in args.ops:
        for mode in ("fwd", "fwd+bwd"):
            for N in grid_n:
                for V in grid_v:
                    rows += run_case(op, mode, N, V, H, dtype, device, args.repeats, peak_gbs)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    print_table(rows)
    default_name = f"kernels-{device.type}{'-smoke' if args.smoke else ''}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    memory_method = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if on_gpu else
                     "VmHWM after /proc/self/clear_refs reset, minus VmRSS before; malloc mmap threshold 64 KiB")
    out.write_text(json.dumps({**env, "mode": "smoke" if args.smoke else "full", "peak_gbs": peak_gbs,
                               "memory_method": memory_method, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

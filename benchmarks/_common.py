"""What the benchmark scripts share: the run record (device, versions, commit, date), percentiles,
host memory readings, and the named model shapes built offline for ppo_step.py and capacity.py.

Imports torch only (and transformers/tokenizers inside the model builders), so the TRL peer's venv
(benchmarks/setup_trl_venv.sh) can import it too.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import platform
import resource
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def git_commit() -> str | None:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("-dirty" if git("status", "--porcelain") else "")) or None
    except OSError:  # no git on the machine
        return None


def environment(device: torch.device, **versions_of) -> dict:
    """device, torch/triton (and any extra package) versions, commit and UTC date for the JSON record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"device": device_name(device), "device_type": device.type, "cpu_threads": torch.get_num_threads(),
           "torch": torch.__version__, "triton": triton_version}
    env.update(versions_of)
    env.update(commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return env


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# Statistics and memory
# ---------------------------------------------------------------------------------------------


def median_p20_p80(values: list[float]) -> tuple[float, float, float]:
    """Median and the 20th / 80th percentiles (inclusive deciles); one value gives it thrice."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(values), q[1], q[7]


def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_rss_mib() -> float:
    """The process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fix_malloc_threshold() -> bool:
    """glibc raises its mmap threshold after each large free (up to 32 MiB), after which freed tensors
    stay in the heap and never leave the resident set; a fixed 64 KiB keeps them mmapped."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Model shapes (random weights, no downloads)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    family: str  # "llama" | "qwen2"
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie_embeddings: bool

    def params(self) -> int:
        """Parameter count (embeddings, attention, MLP, norms, LM head unless tied)."""
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return embed + self.layers * (attn + mlp + 2 * self.hidden) + self.hidden


# Public configs of the models these stand in for (config.json of Qwen2-0.5B / 1.5B, Llama-3.1-8B).
SHAPES = {
    "tiny": Shape("llama", 512, 128, 256, 2, 4, 2, False),  # issue 8's CPU shape
    "tiny-qwen2": Shape("qwen2", 512, 128, 256, 2, 4, 2, True),
    "0.5b": Shape("qwen2", 151936, 896, 4864, 24, 14, 2, True),  # Qwen2-0.5B
    "1.5b": Shape("qwen2", 151936, 1536, 8960, 28, 12, 2, True),  # Qwen2-1.5B
    "8b": Shape("llama", 128256, 4096, 14336, 32, 32, 8, False),  # Llama-3.1-8B
}


def shape_from_json(text: str) -> Shape:
    return Shape(**json.loads(text))


def shape_to_json(shape: Shape) -> str:
    return json.dumps(asdict(shape))


SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
TOKENIZER_WORDS = 1000  # word-level tokenizer size cap; the model's vocab may be larger (spare rows)


def build_tokenizer(vocab: int):
    """Word-level tokenizer "w0 w1 ...", pad distinct from EOS, no BOS added (Qwen2-like): a prompt of
    P words is exactly P tokens for both our data layer and TRL's collator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(min(vocab, TOKENIZER_WORDS) - len(SPECIAL_TOKENS))]
    table = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=4096)


def build_model_dir(shape: Shape, out_dir: Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A randomly initialised causal LM of `shape` plus its tokenizer, `save_pretrained` to `out_dir`.

    Weights are saved in bf16 for shapes above 100M parameters (fp32 below), like released checkpoints.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if (out_dir / "config.json").is_file():
        return out_dir
    tokenizer = build_tokenizer(shape.vocab)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                  tie_word_embeddings=shape.tie_embeddings, **ids)
    config = (LlamaConfig if shape.family == "llama" else Qwen2Config)(**common)
    if dtype is None:
        dtype = torch.bfloat16 if shape.params() > 100e6 else torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    return out_dir


def prompt_texts(n: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    """`n` texts of exactly `length` words (tokens) of `build_tokenizer(vocab)`, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    words = min(vocab, TOKENIZER_WORDS) - len(SPECIAL_TOKENS)
    ids = torch.randint(0, words, (n, length), generator=g)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def percentile_summary(values: list[float]) -> dict:
    median, p20, p80 = median_p20_p80(values)
    return {"median": median, "p20": p20, "p80": p80, "n": len(values), "all": values}

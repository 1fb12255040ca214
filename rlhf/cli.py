"""`rlhf <stage> [--config FILE.yaml] [--model PATH] [--data PATH] [--out DIR] [--any.field value]`.

A thin layer: it reads the YAML and the overrides into the stage's dataclass and calls the same
function a Python user calls (e.g. `rlhf.sft.train(cfg)`). Errors a user can fix are printed as one
line, without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from dataclasses import dataclass

import rlhf
from rlhf.config import field_help, load_config
from rlhf.errors import ConfigError, RLHFError


@dataclass(frozen=True)
class Command:
    config_module: str  # torch-free: all `--help` and config checks import
    config: str
    module: str  # where the entry function lives (imports torch)
    entry: str
    summary: str
    aliases: tuple[tuple[str, str], ...]  # short flag -> dotted config field
    positional: str | None = None  # dotted field a leading bare argument fills (`rlhf import-gguf FILE`)


_BASICS = (("model", "model.path"), ("data", "data.path"), ("out", "out_dir"))

COMMANDS = {
    "toy": Command("rlhf.toy.config", "ToyRunConfig", "rlhf.toy.command", "write_toy_world_from_config",
                   "write the offline toy world (data files + a pretrained tiny model)",
                   (("out", "out_dir"),)),
    "instructions": Command("rlhf.tasks.instructions", "InstructionTaskConfig", "rlhf.tasks.instructions",
                            "write_from_config", "write the instruction task's data (a program-graded real task)",
                            (("out", "out_dir"),)),
    "sft": Command("rlhf.sft_config", "SFTConfig", "rlhf.sft", "train",
                   "stage 1: supervised fine-tuning of the policy adapter", _BASICS),
    "rm": Command("rlhf.reward_config", "RMConfig", "rlhf.reward", "train",
                  "stage 2: reward model from ranked answers",
                  _BASICS + (("sft", "sft_dir"), ("demos", "data.demonstrations"))),
    "ppo": Command("rlhf.ppo.config", "PPOConfig", "rlhf.ppo", "train",
                   "stage 3: PPO / PPO-ptx against the reward model",
                   _BASICS + (("sft", "sft_dir"), ("rm", "rm_dir"), ("pretrain", "data.pretrain"),
                              ("ptx_coef", "ptx_coef"))),
    "pipeline": Command("rlhf.pipeline_config", "PipelineConfig", "rlhf.pipeline", "run",
                        "SFT -> RM -> PPO end to end (no arguments: the toy world)",
                        (("out", "out_dir"), ("model", "model_path"), ("data", "data.dir"), ("gold", "gold"))),
    "eval": Command("rlhf.eval_config", "EvalConfig", "rlhf.eval", "evaluate",
                    "score saved policies: RM score, gold score, win rate, KL to SFT, pretrain loss",
                    (("model", "model.path"), ("data", "data.path"), ("out", "out_dir"), ("sft", "sft_dir"),
                     ("rm", "rm_dir"), ("policy", "policy_dir"), ("pretrain", "data.pretrain"))),
    "import-gguf": Command("rlhf.models.gguf_import", "ImportGGUFConfig", "rlhf.models.gguf_import",
                           "import_gguf_from_config",
                           "convert a .gguf model into a Hugging Face directory (FILE.gguf --out DIR)",
                           (("out", "out_dir"),), positional="gguf"),
}


def _usage() -> str:
    lines = ["usage: rlhf <command> [--config FILE.yaml] [--field value ...]", "", "commands:"]
    lines += [f"  {name:<9} {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "`rlhf <command> --help` lists every field of that command's config, with its default and why.",
              "`rlhf <command> --num_processes N ...` runs it data-parallel on N processes",
              "(= accelerate launch --multi_gpu --num_processes N -m rlhf <command> ...).",
              "`rlhf --version` prints the version."]
    return "\n".join(lines)


def _command_help(name: str, cmd: Command, config_cls: type) -> str:
    lines = [f"usage: rlhf {name} [--config FILE.yaml] [--field value ...]", "", cmd.summary, ""]
    if cmd.aliases:
        lines.append("shortcuts:")
        lines += [f"  --{short:<10} = --{dotted}" for short, dotted in cmd.aliases]
        lines.append("")
    lines.append("config fields: dotted names for nested fields, values parsed as YAML; each default is what")
    lines.append(f"`rlhf {name}` runs with, each note where that default comes from ({{a,b}}: the allowed values)")
    lines.append("")
    wrap = dict(width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    for row in field_help(config_cls):
        if row.group:
            lines += ["", f"  {row.name}.* ({row.type})"]
            lines += textwrap.wrap(row.why, **wrap)
            continue
        group = row.name.rpartition(".")[0]
        note = f", see {group}.* above; {row.class_default}" if row.class_default else ""
        lines.append(f"  --{row.name} {row.type}  (default: {row.default}{note})")
        lines += textwrap.wrap(row.why, **wrap)
    return "\n".join(lines)


def _write(text: str, stream=None) -> None:
    """print(), but a reader that stops early (`rlhf -h | head -3`) ends the output quietly."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream)
        stream.flush()
    except BrokenPipeError:
        # whatever is still buffered would fail again at exit: point stdout at /dev/null (Python docs,
        # "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_overrides(args: list[str], aliases: dict[str, str]) -> tuple[str | None, dict[str, str], bool]:
    """`--config F`, `--key value`, `--key=value`, bare `--flag` (= true) -> (config, overrides, help)."""
    config_path, overrides, want_help = None, {}, False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            want_help = True
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': options look like --field value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        i += 1
        if key == "config":
            config_path = value
            continue
        overrides[aliases.get(key, key)] = value
    return config_path, overrides, want_help


def _num_processes(rest: list[str]) -> tuple[int, list[str]]:
    """`--num_processes N` (or `=N`) taken out of the arguments -> (N, the other arguments); N = 1 if absent."""
    for i, arg in enumerate(rest):
        if arg == "--num_processes" or arg.startswith("--num_processes="):
            value = arg.partition("=")[2] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else "")
            others = rest[:i] + rest[i + (1 if "=" in arg else 2):]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--num_processes: expected a whole number >= 1, got {value!r}")
            return int(value), others
    return 1, rest


def _launch(name: str, n: int, rest: list[str]) -> int:
    """Run `rlhf <name> ...` on `n` processes through accelerate (the same as `accelerate launch --multi_gpu
    --num_processes n -m rlhf <name> ...`): DDP over NCCL on GPUs, gloo on CPU."""
    import subprocess

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--num_processes is for a plain `rlhf` command; under `accelerate launch` or torchrun "
                          "the launcher's --num_processes decides")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf", name, *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _write(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        _write(f"rlhf {rlhf.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhf: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    # progress lines: the `rlhf` logger prints them as it does for Python API users (rlhf/__init__.py)
    try:
        processes, rest = _num_processes(rest)
        if processes > 1 and name == "toy":
            raise ConfigError("--num_processes: `rlhf toy` writes the toy world in one process")
        if processes > 1 and not {"-h", "--help"} & set(rest):
            return _launch(name, processes, rest)
        config_cls = getattr(importlib.import_module(cmd.config_module), cmd.config)
        if cmd.positional and rest and not rest[0].startswith("-"):
            rest = [f"--{cmd.positional}", *rest]
        config_path, overrides, want_help = parse_overrides(rest, dict(cmd.aliases))
        if want_help:
            _write(_command_help(name, cmd, config_cls))
            return 0
        cfg = load_config(config_cls, config_path, overrides)
        getattr(importlib.import_module(cmd.module), cmd.entry)(cfg)  # the first torch import
    except RLHFError as err:
        print(f"rlhf {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a stage's message says what exists and what a rerun does
        print(f"rlhf {name}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

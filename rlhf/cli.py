"""`rlhf <stage> [--config FILE.yaml] [--model PATH] [--data PATH] [--out DIR] [--any.field value]`.

A thin layer: it reads the YAML and the overrides into the stage's dataclass and calls the same
function a Python user calls (e.g. `rlhf.sft.train(cfg)`). Errors a user can fix are printed as one
line, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass

from rlhf.config import field_help, load_config
from rlhf.errors import ConfigError, RLHFError


@dataclass(frozen=True)
class Command:
    module: str  # where the config class and the entry function live
    config: str
    entry: str
    summary: str
    aliases: tuple[tuple[str, str], ...]  # short flag -> dotted config field
    positional: str | None = None  # dotted field a leading bare argument fills (`rlhf import-gguf FILE`)


_BASICS = (("model", "model.path"), ("data", "data.path"), ("out", "out_dir"))

COMMANDS = {
    "toy": Command("rlhf.toy.command", "ToyRunConfig", "write_toy_world_from_config",
                   "write the offline toy world (data files + a pretrained tiny model)",
                   (("out", "out_dir"),)),
    "sft": Command("rlhf.sft", "SFTConfig", "train", "stage 1: supervised fine-tuning of the policy adapter",
                   _BASICS),
    "rm": Command("rlhf.reward", "RMConfig", "train", "stage 2: reward model from ranked answers",
                  _BASICS + (("sft", "sft_dir"), ("demos", "data.demonstrations"))),
    "ppo": Command("rlhf.ppo", "PPOConfig", "train", "stage 3: PPO / PPO-ptx against the reward model",
                   _BASICS + (("sft", "sft_dir"), ("rm", "rm_dir"), ("pretrain", "data.pretrain"),
                              ("ptx_coef", "ptx_coef"))),
    "pipeline": Command("rlhf.pipeline", "PipelineConfig", "run",
                        "SFT -> RM -> PPO end to end (no arguments: the toy world)",
                        (("out", "out_dir"), ("model", "model_path"), ("data", "data.dir"))),
    "eval": Command("rlhf.eval", "EvalConfig", "evaluate",
                    "score saved policies: RM score, gold score, win rate, KL to SFT, pretrain loss",
                    (("model", "model.path"), ("data", "data.path"), ("out", "out_dir"), ("sft", "sft_dir"),
                     ("rm", "rm_dir"), ("policy", "policy_dir"), ("pretrain", "data.pretrain"))),
    "import-gguf": Command("rlhf.models.gguf_import", "ImportGGUFConfig", "import_gguf_from_config",
                           "convert a .gguf model into a Hugging Face directory (FILE.gguf --out DIR)",
                           (("out", "out_dir"),), positional="gguf"),
}


def _usage() -> str:
    lines = ["usage: rlhf <command> [--config FILE.yaml] [--field value ...]", "", "commands:"]
    lines += [f"  {name:<9} {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "`rlhf <command> --help` lists every field of that command's config."]
    return "\n".join(lines)


def _command_help(name: str, cmd: Command, config_cls: type) -> str:
    lines = [f"usage: rlhf {name} [--config FILE.yaml] [--field value ...]", "", cmd.summary, ""]
    if cmd.aliases:
        lines.append("shortcuts:")
        lines += [f"  --{short:<10} = --{dotted}" for short, dotted in cmd.aliases]
        lines.append("")
    lines.append("config fields (dotted names for nested fields; values are parsed as YAML):")
    for dotted, type_name, default in field_help(config_cls):
        lines.append(f"  --{dotted:<32} {type_name:<18} default {default}")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhf: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # bitsandbytes warns at import on every CPU machine that an optional faster CPU kernel is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        module = importlib.import_module(cmd.module)
        config_cls = getattr(module, cmd.config)
        if cmd.positional and rest and not rest[0].startswith("-"):
            rest = [f"--{cmd.positional}", *rest]
        config_path, overrides, want_help = parse_overrides(rest, dict(cmd.aliases))
        if want_help:
            try:
                print(_command_help(name, cmd, config_cls))
            except BrokenPipeError:  # `rlhf ppo --help | head`
                pass
            return 0
        cfg = load_config(config_cls, config_path, overrides)
        getattr(module, cmd.entry)(cfg)
    except RLHFError as err:
        print(f"rlhf {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {name}: interrupted; rerun with --resume auto to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

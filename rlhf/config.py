"""Dataclass configs from YAML plus dotted overrides, checked before any model loads.

Every stage has one dataclass (nested where it groups things, e.g. `PPOConfig.kl`). This module turns
a YAML file and `--a.b value` overrides into that dataclass, refusing unknown keys (with a
did-you-mean) and wrongly typed values, naming the dotted field each time. The dataclass's own
`validate()` then checks fields against each other (lm-human-preferences `HParams.validate` style).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

from rlhf.config_hints import typed_key, unknown_key_hint
from rlhf.errors import ConfigError
from rlhf.field_docs import field_docs

C = TypeVar("C")

# `data.use_chat_template` of every stage: "auto" renders prompts with the tokenizer's chat template when
# it has one, true requires one, false writes texts as they are (rlhf.data.tokenize says how)
ChatTemplateSetting = Union[Literal["auto"], bool]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and, for the few safe cases, convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{where}"): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; everyone means the number
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a YAML `1e-5` or `2024` meant as text (a path, a name)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type[C], values: Mapping[str, Any], prefix: str = "", base: C | None = None,
              root: type | None = None) -> C:
    """Build dataclass `cls` from a (nested) mapping; unknown keys and bad types raise ConfigError.

    Fields absent from `values` keep their defaults, those of `base` when given. A nested dataclass
    given as a mapping starts from the enclosing field's own default, so `model.path` alone keeps
    the rest of SFTConfig's `ModelConfig(lora_dropout=0.2)` rather than falling back to ModelConfig().
    `root` is the outermost config class (`cls` at the top): unknown keys are matched against all its names.
    """
    root = root or cls
    types_by_name = _field_types(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields_by_name)
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            typed = typed_key(where, value)
            hint = unknown_key_hint(typed, key, root, names, f"{prefix}." if prefix else "")
            raise ConfigError(f"unknown config key '{typed}'{hint}")
        tp = types_by_name[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            default = getattr(base, key) if base is not None else _field_default(fields_by_name[key])
            kwargs[key] = from_dict(tp, value, where, default if isinstance(default, tp) else None, root)
        else:
            kwargs[key] = _coerce(value, tp, where)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (`3` -> int, `true` -> bool, `[a, b]` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}': '{part}' is a value, not a group of fields")
        node = child
    node[leaf] = value


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config fields, got {type(loaded).__name__}")
    return loaded


def load_config(
    cls: type[C],
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """YAML file (optional) + dotted overrides (`{"ppo.kl.coef": "0.05"}`) -> validated `cls`.

    Override values given as strings are parsed as YAML scalars, so the CLI and a YAML file agree.
    """
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for dotted, raw in (overrides or {}).items():
        value = _parse_scalar(raw) if isinstance(raw, str) else raw
        patch: dict[str, Any] = {}
        set_dotted(patch, dotted, value)
        tree = _deep_merge(tree, patch)
    cfg = from_dict(cls, tree)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Run `validate()` on every nested dataclass, innermost first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def require_path(value: str, field: str, kind: str = "path", flag: str = "") -> Path:
    """A config path that must exist before any work starts. `flag`: the CLI's way to give it
    (`--data sft.jsonl`), named in the message beside the field."""
    if not value:
        raise ConfigError(f"{field}: a {kind} is required" + (f" ({flag})" if flag else ""))
    path = Path(value)
    if not path.exists():
        where = f"{field} ({flag.split()[0]})" if flag else field
        raise ConfigError(f"{where}: {kind} '{value}' does not exist")
    return path


# "org/name" (or a legacy single name like "gpt2"): what the Hugging Face Hub accepts as a repo id
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(value: str) -> bool:
    """Whether a model path that is not on disk may be a Hub id, resolved by `from_pretrained` (its cache,
    HF_HUB_OFFLINE and all). Paths spelled as paths (./x, /x, a/b/c, x.gguf) never are."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value and not value.endswith(".gguf")


def require_model_source(value: str, field: str, flag: str = "--model") -> None:
    """A model given as a local directory, a .gguf file or a Hugging Face Hub id, checked before any work."""
    if not value:
        raise ConfigError(f"{field}: a model is required ({flag} DIR, FILE.gguf or a Hub id)")
    if Path(value).exists() or looks_like_hub_id(value):
        return
    raise ConfigError(f"{field} ({flag}): model '{value}' does not exist (expected a local Hugging Face directory, "
                      "a .gguf file or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)")


class FieldHelp(typing.NamedTuple):
    name: str  # dotted
    type: str  # "{nf4,none}" for a Literal
    default: str  # as YAML would write it
    why: str  # the field's source comment ("" when it has none)
    group: bool = False  # a nested dataclass (a heading over its fields), not a leaf
    # when the enclosing config changes this default (its note on the group says why): the default of
    # the field's own class, e.g. "OptimConfig: 0.001" under PPOConfig.optim; else ""
    class_default: str = ""


def field_help(cfg: Any, prefix: str = "") -> list[FieldHelp]:
    """Every field of config `cfg` (a dataclass or an instance): the leaves of each level, then its groups
    (a heading row, then their fields).

    Defaults are read from an instance, so they are the values a run would use: `SFTConfig().optim.lr`
    is 2e-3 even though `OptimConfig().lr` is 1e-3.
    """
    instance = cfg() if isinstance(cfg, type) else cfg
    cls = type(instance)
    docs = field_docs(cls)
    types_by_name = _field_types(cls)
    own_defaults = cls() if prefix else instance  # the class's own defaults, to spot what a parent changed
    leaves, groups = [], []
    for f in dataclasses.fields(cls):
        name, tp, value = f"{prefix}{f.name}", types_by_name[f.name], getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            groups.append(FieldHelp(name, tp.__name__, "", docs.get(f.name, ""), group=True))
            groups.extend(field_help(value, prefix=name + "."))
            continue
        own = getattr(own_defaults, f.name)
        leaves.append(FieldHelp(name, _help_type(tp), _yaml_value(value), docs.get(f.name, ""),
                                class_default=f"{cls.__name__}: {_yaml_value(own)}" if value != own else ""))
    return leaves + groups


def _help_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if arg is type(None) else _help_type(arg) for arg in typing.get_args(tp))
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"list[{_help_type(item)}]"
    if origin is dict:
        key, value = typing.get_args(tp) or (Any, Any)
        return f"dict[{_help_type(key)}, {_help_type(value)}]"
    return _type_name(tp)


def _yaml_value(value: Any) -> str:
    """How the value is written on the command line or in YAML (`null`, `''`, `[ppo, ppo_ptx]`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()

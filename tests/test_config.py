"""Config loading: YAML + dotted overrides into dataclasses, with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rlhf.config import field_help, load_config, save_config, read_yaml
from rlhf.errors import ConfigError


@dataclass
class Inner:
    coef: float = 0.02
    target: float | None = None
    names: list[str] = field(default_factory=lambda: ["a"])

    def validate(self) -> None:
        if self.coef < 0:
            raise ConfigError(f"inner.coef must be >= 0, got {self.coef}")


@dataclass
class Outer:
    out_dir: str = "runs/x"
    epochs: int = 2
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\ninner:\n  coef: 0.1\n")
    cfg = load_config(Outer, path, {"inner.target": "6.0", "flag": "true", "inner.names": "[x, y]"})
    assert cfg.epochs == 5 and cfg.inner.coef == 0.1 and cfg.inner.target == 6.0
    assert cfg.flag is True and cfg.inner.names == ["x", "y"] and cfg.out_dir == "runs/x"


def test_unknown_key_suggests_the_close_one():
    # the full dotted name, not the bare field
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.cof'; did you mean 'inner.coef'\?"):
        load_config(Outer, None, {"inner.cof": "1"})
    with pytest.raises(ConfigError, match="unknown config key 'zzz'; known keys"):
        load_config(Outer, None, {"zzz": "1"})


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "two", r"epochs: expected an integer, got 'two'"),
    ("epochs", "2.5", r"epochs: expected an integer, got 2.5"),
    ("flag", "3", r"flag: expected true or false, got 3"),
    ("inner.coef", "[1]", r"inner.coef: expected a number"),
    ("inner", "5", r"inner: expected a mapping of Inner fields"),
    ("inner.coef.x", "1", r"inner.coef: expected a number, got \{'x': 1\}"),
])
def test_wrong_types_name_the_field(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, {key: value})


def test_validate_runs_on_nested_configs():
    with pytest.raises(ConfigError, match="inner.coef must be >= 0, got -1"):
        load_config(Outer, None, {"inner.coef": "-1"})


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(listy)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, {"inner.coef": "0.5"})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Outer, tmp_path / "config.yaml") == cfg
    assert not (tmp_path / "config.yaml.tmp").exists()


def test_field_help_lists_dotted_leaves():
    names = [row.name for row in field_help(Outer) if not row.group]
    assert names == ["out_dir", "epochs", "flag", "inner.coef", "inner.target", "inner.names"]


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 (PyYAML) reads `1e-4` as a string; a learning rate written that way must still work
    assert load_config(Outer, overrides={"inner.coef": "1e-4"}).inner.coef == 1e-4
    assert load_config(Outer, overrides={"inner.coef": "3E2"}).inner.coef == 300.0
    with pytest.raises(ConfigError, match="inner.coef: expected a number, got 'fast'"):
        load_config(Outer, overrides={"inner.coef": "fast"})

"""Imports go one way (STYLE.md section 1): kernels <- models/data/toy <- stages <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("rlhf.sft", "rlhf.reward", "rlhf.ppo", "rlhf.eval", "rlhf.pipeline", "rlhf.labelling")
LOWER_LAYERS = ("rlhf.models", "rlhf.data", "rlhf.toy", "rlhf.tasks")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules_under(package: str) -> list[Path]:
    base = ROOT / Path(*package.split("."))
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


def starts_with_any(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules_under("rlhf_kernels"), ids=lambda p: p.name)
def test_kernels_import_only_torch_and_triton(path):
    third_party = {n.split(".")[0] for n in imported_modules(path)} - {"rlhf_kernels", "__future__"}
    allowed = {"torch", "triton", "os", "math", "functools", "typing", "dataclasses", "contextlib", "warnings",
               "importlib", "collections"}
    assert third_party <= allowed, f"{path.name} imports {sorted(third_party - allowed)}"


@pytest.mark.parametrize("package", LOWER_LAYERS)
def test_lower_layers_never_import_a_stage(package):
    for path in modules_under(package):
        bad = [n for n in imported_modules(path) if starts_with_any(n, STAGES + ("rlhf.cli",))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_cli_uses_only_the_stage_api():
    bad = [n for n in imported_modules(ROOT / "rlhf" / "cli.py")
           if n.startswith("rlhf.") and not starts_with_any(n, ("rlhf.config", "rlhf.errors"))]
    assert not bad, f"rlhf/cli.py imports internals {bad} (stages are imported by name at run time)"

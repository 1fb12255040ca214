"""PEP 562 lazy names for a package `__init__`: `from rlhf.models import RoleModel` imports
`rlhf.models.roles` only when asked, so a torch-free submodule (a config, what `--help` reads) can
be imported without pulling torch, transformers and peft in through its package."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, sources: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`{name: module}` -> the package's `__getattr__` and `__dir__`."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(sources[name]), name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(sources))

    return __getattr__, __dir__

"""Lazy public exports: a package names what it exports and where, and imports it on first use,
so `import jaxsys.x` (and `jaxsys --help`) stays cheap and never pulls in jax by accident."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(module_name: str, table: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Returns (__getattr__, __dir__, __all__) for a module whose public names live in `table`
    (public name -> module that defines it)."""
    public = sorted(table)

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[module_name], name, value)
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return public

    return __getattr__, __dir__, public

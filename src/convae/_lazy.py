"""Lazy package exports: a package's names load their module on first use.

`import convae` (and `convae --help`) must not pay for torch, scikit-learn and matplotlib, and
the torch-free parts of a subpackage (its option types) must import without the rest. Each
package lists its exports statically (``__all__`` and a name -> module table, with
``TYPE_CHECKING`` imports for static tools); :func:`exports` makes the module-level
``__getattr__`` and ``__dir__`` that resolve them (PEP 562).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, table: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: `table` maps an exported name to its module
    (relative, e.g. ".files"); a submodule's own name maps to itself."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module, package)
        value = loaded if module.lstrip(".") == name else getattr(loaded, name)
        namespace[name] = value  # next time, a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__

"""Lazy public names for the packages of imagegem_hf (PEP 562 module `__getattr__`).

A package lists where each public name lives; importing the package imports none of them, and the first access to
a name imports its module. `import imagegem_hf.recsys` therefore stays cheap, and building the `imagegem` parser for
one area never pulls in torch, transformers or diffusers through the package's `__init__`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """The `__getattr__`, `__dir__` and `__all__` of a package whose public names are imported on first use.

    Args:
        package: The package's `__name__` (used in the `AttributeError` message).
        exports: `{public name: module that defines it}`.
        namespace: The package's `globals()`; a resolved name is cached there, so it is looked up once.

    Returns:
        `(__getattr__, __dir__, __all__)`, to be assigned at the package's top level.

    Example:
        ```python
        >>> import types
        >>> module = types.ModuleType("pkg")
        >>> getattr_, dir_, all_ = lazy_exports("pkg", {"sqrt": "math"}, vars(module))
        >>> getattr_("sqrt")(9.0), all_
        (3.0, ['sqrt'])
        ```
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__, sorted(exports)

"""Module attributes imported on first use (PEP 562), so light entry points do not pay for torch."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, table: dict[str, str], namespace: dict):
    """A module ``__getattr__``: ``name`` comes from ``table[name]``, a module relative to ``package``
    (``".mod"``: its attribute ``name``; ``".mod:attr"``: its attribute ``attr``), imported on first use and
    then kept in ``namespace`` (the module's globals)."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = table[name].partition(":")
        value = getattr(importlib.import_module(module, package), attr or name)
        namespace[name] = value
        return value

    return __getattr__

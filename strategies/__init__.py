"""The strategy registry: every ``Strategy`` subclass defined in a module of this package.

Names resolve only through ``REGISTRY`` (never by importing a name taken from a spec).
"""

from __future__ import annotations

import importlib
import pkgutil

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy, StrategyConfig


def _discover() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base" or info.name.startswith("_"):  # the contract, and helpers shared by strategies
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Strategy) and obj is not Strategy and obj.__module__ == module.__name__:
                name = obj.Config.model_fields["name"].default
                if name in found:
                    raise RuntimeError(f"strategy name {name!r} is defined twice ({found[name].__module__}, {module.__name__})")
                found[name] = obj
    return found


REGISTRY: dict[str, type[Strategy]] = _discover()

__all__ = ["REGISTRY", "Batch", "Context", "MemoryConfig", "Strategy", "StrategyConfig"]

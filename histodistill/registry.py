"""Registries of named implementations, one per method family (distillation methods, selectors,
generators, MIL models, patch classifiers): config files name a method, the registry finds it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type]) -> Callable[[str], Callable[[T], T]]:
    """The class decorator factory of one family: ``@register("name")`` adds the class to
    ``table`` under ``name`` and records the name as its ``name`` attribute."""

    def register(name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            cls.name = name
            table[name] = cls
            return cls

        return wrap

    return register

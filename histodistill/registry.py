"""Registries of named implementations, one per method family (distillation methods, selectors,
generators, MIL models, patch classifiers): config files name a method, the registry finds it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from histodistill import catalogue

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type]) -> Callable[[str], Callable[[T], T]]:
    """The class decorator factory of one family: ``@register("name")`` adds the class to
    ``table`` under ``name`` and records the name as its ``name`` attribute."""

    def register(name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            setattr(cls, "name", name)  # T is any class: the attribute may be new to it
            table[name] = cls
            return cls

        return wrap

    return register


def import_catalogued(stage: str) -> None:
    """Import every module the catalogue names for ``stage`` (their imports register the
    methods). A module that calls this declares ``__registry__ = "<stage>"`` at module level,
    so the code-hash walker (:func:`histodistill.params.library_files`) follows these imports
    too."""
    for module in catalogue.modules(stage):
        importlib.import_module(module)

"""The result file of a distilled set, joined from the files of the stages that evaluate it.

``patch`` (rule ``evaluate``) is the base: dataset, method, ipc, patch-level metrics, the
full-data upper bound, cost, config and versions. Every other part (e.g. ``slide`` from
slide-level MIL, ``privacy`` from the privacy audit) is stored under its own key. Each part is
written by its own rule, so a stage's settings rerun that stage and this join only.
"""

from __future__ import annotations

import os
from typing import Any

from histodistill.io import InputError, read_json, write_json


def assemble(parts: dict[str, str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Join ``parts`` (name -> JSON file; ``patch`` required) into one result at ``out``."""
    if "patch" not in parts:
        raise InputError("result", out, "a result needs its patch-level evaluation ('patch')")
    result = read_json(parts["patch"], "result")
    for name, path in parts.items():
        if name == "patch":
            continue
        if name in result:
            raise InputError("result", path, f"section {name!r} is already in the patch result")
        result[name] = read_json(path, "result")
    write_json(out, result)
    return result

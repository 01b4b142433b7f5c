"""What a workflow rule's ``params`` hold, so that Snakemake's params trigger reruns the jobs whose
settings or library code changed, and no others.

Snakemake compares the ``repr`` of each param with the one recorded when the output was built.
So params hold only the settings a rule reads, with every mapping in sorted key order (reordering
a section changes nothing), and no operational knob (:data:`OPERATIONAL`: memory budgets and
checkpoint intervals, which the rules pass as resources). Snakemake's ``code`` trigger sees only
a rule's wrapper script, so each rule also carries :func:`library_hash` of the library modules
that script imports.
"""

from __future__ import annotations

import ast
import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from histodistill import catalogue

PACKAGE = Path(__file__).resolve().parent

# How a rule runs (memory budget, checkpoint cadence), not which method settings it runs with:
# passed as resources, so changing them reruns nothing (README: "Running on a cluster").
OPERATIONAL = ("cache_mb", "checkpoint_every")


def canonical(value: Any) -> Any:
    """``value`` with every mapping rebuilt in sorted key order (its repr no longer depends on the
    order keys were written or merged in)."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def without_operational(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the :data:`OPERATIONAL` keys, canonical."""
    return canonical({k: v for k, v in settings.items() if k not in OPERATIONAL})


def full_train_settings(evaluate: dict[str, Any], arch: str) -> dict[str, Any]:
    """What ``full_train`` reads for one architecture: its own ``arch_kwargs`` only, so adding an
    architecture or changing ``runs``/``train`` leaves the cached upper bounds alone."""
    keys = ("augment", "full", "seed", "stain_norm")  # the default protocol's stain_norm
    return canonical({**{k: evaluate[k] for k in keys if k in evaluate},
                      "arch_kwargs": {arch: evaluate["arch_kwargs"].get(arch, {})}})


def stain_protocol(evaluate: dict[str, Any], method: str | None) -> bool:
    """Whether ``method``'s sets are evaluated with test-time stain normalisation: on for the
    methods in ``stain_norm_methods`` (their paper's protocol), else ``stain_norm``."""
    return method in evaluate["stain_norm_methods"] or bool(evaluate["stain_norm"])


def evaluate_settings(evaluate: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    """What ``evaluate`` reads: the section without ``full`` (it reads the cached upper bounds
    from files), without operational knobs, and ``arch_kwargs`` only of the evaluated archs.
    ``cross_arch`` becomes ``extra_archs``, the further architectures this ``method`` is trained
    on, so editing the cross-architecture settings reruns only the methods they name."""
    kwargs = evaluate["arch_kwargs"]
    cross = evaluate["cross_arch"]
    extra = [a for a in cross["archs"] if a not in evaluate["archs"]
             ] if method in cross["methods"] else []
    picked = {k: v for k, v in evaluate.items()
              if k not in ("full", "arch_kwargs", "cross_arch", "stain_norm_methods")}
    picked["stain_norm"] = stain_protocol(evaluate, method)
    picked["arch_kwargs"] = {a: kwargs[a] for a in [*evaluate["archs"], *extra] if a in kwargs}
    if extra:
        picked["extra_archs"] = extra
    return without_operational(picked)


def _module_file(module: str) -> Path | None:
    """The source file of a module of this package, or None for anything else."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def _imported_modules(path: Path) -> frozenset[str]:
    """Modules of this package that ``path`` imports (statically, at any depth in the file), with
    their parent packages (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    found.update(_registered(tree))
    return frozenset(m for m in found if m.split(".")[0] == PACKAGE.name)


def _registered(tree: ast.Module) -> list[str]:
    """The catalogue's modules of the stage a module declares with ``__registry__ = "<stage>"``
    (it imports them by name: :func:`histodistill.registry.import_catalogued`)."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "__registry__"
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return catalogue.modules(node.value.value)
    return []


@lru_cache(maxsize=None)
def library_files(script: str) -> tuple[Path, ...]:
    """Every source file of this package that ``script`` imports, followed transitively."""
    seen: set[Path] = set()
    todo = [Path(script)]
    while todo:
        for module in _imported_modules(todo.pop()):
            path = _module_file(module)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return tuple(sorted(seen))


def library_hash(script: str | os.PathLike) -> str:
    """A short hash of the library code ``script`` runs: a rule param that changes when any module
    the script imports (directly or not) changes, and only then."""
    digest = hashlib.sha256()
    for path in library_files(str(Path(script).resolve())):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tuning_settings(evaluate: dict[str, Any], tuning: dict[str, Any], method: str
                    ) -> dict[str, Any]:
    """How a tuning candidate is evaluated: ``method``'s evaluation settings on its evaluated
    architectures only (no cross-architecture extras, one stain protocol, its own), with
    ``tuning.runs`` training runs."""
    picked = evaluate_settings(evaluate, method)
    picked.pop("extra_archs", None)
    return canonical({**picked, "runs": tuning["runs"], "both_protocols": False})


def study_settings(evaluate: dict[str, Any], method: str, *, both_protocols: bool) -> dict[str, Any]:
    """How a study set is evaluated: ``method``'s evaluation settings (its cross-architecture
    extras included: a study may ask about them) under its own stain protocol, and under the
    other one too when the study asks (``both_protocols``)."""
    return canonical({**evaluate_settings(evaluate, method), "both_protocols": both_protocols})


def privacy_audit_settings(privacy: dict[str, Any]) -> dict[str, Any]:
    """What ``privacy_audit`` reads: the ``privacy`` section without ``package`` (the package's
    opt-ins, licence and texts rerun only the package) and without the block size ``batch``
    (a resource: it changes how the distances are computed, not what they are)."""
    return canonical({k: v for k, v in privacy.items() if k not in ("package", "batch")})

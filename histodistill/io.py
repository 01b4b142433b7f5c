"""Errors that name the file and the stage, and atomic writes (temp path, then rename)."""

from __future__ import annotations

import contextlib
import csv
import difflib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input: the message names the pipeline stage and the offending file or key."""

    def __init__(self, stage: str, where: str | os.PathLike, message: str) -> None:
        self.stage, self.where = stage, str(where)
        super().__init__(f"[{stage}] {where}: {message}")


WRITE_ERRORS = {errno.EACCES: "permission denied (a read-only folder?)",
                errno.EPERM: "operation not permitted (a read-only folder?)",
                errno.EROFS: "the file system is read-only",
                errno.ENOSPC: "no space left on the device (a full disk)",
                errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "file too large (a file-size limit, or a full disk)"}


class OutputError(OSError):
    """An output that cannot be written (a read-only folder, a full disk): names the file; the
    partial write is removed."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"[write] {path}: cannot be written: {reason}; nothing partial was "
                         "left behind")


def output_error(err: BaseException, path: str | os.PathLike) -> OutputError | None:
    """``err`` as an :class:`OutputError` for ``path`` when it is a failed write (a write
    errno, or torch's serialiser failing), else None."""
    if isinstance(err, OutputError):
        return err
    if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
        return OutputError(path, WRITE_ERRORS[err.errno])  # the output, not a temporary's name
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err)
                                          or "inline_container" in str(err)):
        return OutputError(path, "torch could not write it (a full disk or a read-only folder?)")
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``final``, on error remove it.

    Works for files and directories (zarr stores), so a crash never leaves a partial output;
    the temporaries a killed earlier write left beside ``final`` are removed first. A failed
    write (read-only folder, full disk) is an :class:`OutputError` naming ``final``.
    """
    final, tmp = Path(final), None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        ours = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkdtemp's names
        for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
            if ours.fullmatch(stale.name):
                remove_path(stale)  # left by a killed earlier write of the same output
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        shutil.rmtree(tmp)  # only the unique name is wanted; the caller creates file or directory
        yield tmp
        remove_path(final)
        os.replace(tmp, final)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                remove_path(tmp)
        failed = output_error(err, final)
        if failed is not None:
            raise failed from None
        raise


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def confine(path: str | os.PathLike, roots: list[str | os.PathLike], stage: str,
            where: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute and normalised (lexically: a symlink inside a root is the user's
    own choice; callers store the path as given and use this one to compare), or an
    :class:`InputError` at ``where`` when it lies outside every root (an absolute path or ``..``
    leading elsewhere would read files the dataset does not hold)."""
    full = os.path.normpath(os.path.abspath(path))
    bases = [os.path.normpath(os.path.abspath(r)) for r in roots]
    if not any(os.path.commonpath([b, full]) == b for b in bases):
        raise InputError(stage, where, f"{what} {str(path)!r} resolves to {full}, outside the "
                         f"dataset root{'s' if len(bases) > 1 else ''} {', '.join(bases)}; list "
                         "files inside it (or name their folder in datasets.<name>.extra_roots)")
    return Path(full)


def read_csv(path: str | os.PathLike, stage: str, required: list[str],
             filled: list[str] | tuple[str, ...] = ()) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV with a header row, checked: UTF-8 text (a byte-order mark is
    allowed), no repeated column name, the ``required`` columns present, every row with exactly
    the header's fields, and no empty cell in the ``filled`` columns. Anything else is an
    :class:`InputError` naming the file and line (a short row would read as missing values, an
    extra field or a repeated column as the wrong label)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise InputError(stage, path, f"column(s) {repeated} appear more than once in "
                                 "the header")
            missing = sorted(set(required) - set(header))
            if missing:
                raise InputError(stage, path, f"missing column(s) {missing} (header: {header})")
            rows = []
            for rec in reader:
                line = reader.line_num
                if None in rec:
                    raise InputError(stage, f"{path}, line {line}", f"has {len(header) + len(rec[None])} "
                                     f"fields, the header {len(header)}")
                short = [c for c in header if rec[c] is None]
                if short:
                    raise InputError(stage, f"{path}, line {line}", f"has {len(header) - len(short)} "
                                     f"fields, the header {len(header)} (no {short})")
                empty = [c for c in filled if not rec[c].strip()]
                if empty:
                    raise InputError(stage, f"{path}, line {line}", f"empty {empty} cell")
                rows.append((line, rec))
    except UnicodeDecodeError as err:
        raise InputError(stage, path, f"is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "save it as UTF-8") from None
    except csv.Error as err:
        raise InputError(stage, path, f"is not a readable CSV ({err})") from None
    return rows


def did_you_mean(value: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' for the option that ``value`` matches ignoring case and spaces,
    else the nearest spelling; '' when none is close. Nothing is matched for the user: the
    suggestion goes into the error."""
    folded = {o.strip().lower(): o for o in options}
    match = folded.get(value.strip().lower()) or next(
        iter(difflib.get_close_matches(value, options, n=1, cutoff=0.6)), None)
    return f" (did you mean {match!r}?)" if match else ""


def settings_hash(obj: Any) -> str:
    """Stable short hash of JSON-able settings (decides whether a partial run can resume)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: str | os.PathLike, stage: str) -> Any:
    """A JSON file a stage reads (a pipeline output, a template, a result), or one
    :class:`InputError` naming the stage and the file when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(stage, path, "does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(stage, path, f"is not valid JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno}); delete it so that the rule writing it reruns"
                         ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(stage, path, f"cannot be read ({err})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_figures(figures: list[str], path: str | os.PathLike) -> None:
    """Print benchmark figures (``name: value`` lines) and save them where the README quotes them."""
    print("\n".join(figures))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(figures) + "\n")


def dataset_root(name: str, dataset: dict[str, Any], stage: str) -> Path:
    """Dataset ``name``'s ``root`` folder, or one error of ``stage`` naming the config key to
    set (shared by the slide cohorts and the patch ingest, which know nothing of each other)."""
    root = dataset.get("root")
    if not root:
        raise InputError(stage, f"config datasets.{name}.root",
                         "is not set: point it at the dataset's folder in config.yaml")
    path = Path(root)
    if not path.exists():
        raise InputError(stage, f"config datasets.{name}.root",
                         f"folder {path} does not exist (set datasets.{name}.root)")
    return path

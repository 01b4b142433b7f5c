"""State files: what a stage writes and reads back (resume checkpoints, Histo-DD's pool, encoders,
generators, trained models).

Every state file holds tensors and plain data only and is read back with torch's weights-only
loader, so a pickle planted under ``results/`` runs nothing: it is refused. A header written
last carries the payload's length and SHA-256, so a file truncated by a kill, a full disk or a
copy, or altered afterwards, is detected and named instead of half-read. A damaged resume
checkpoint is logged by name and the work redone (:func:`load_resume`); a damaged input of a
stage is an error naming the file and the rule to rerun (:func:`load_input`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from histodistill.io import InputError, atomic_path, read_json, remove_path

log = logging.getLogger(__name__)

MAGIC = b"histodistill-state/1"
HEADER = len(MAGIC) + 1 + 64 + 1 + 16 + 1  # magic, sha256 hex, payload length, newline
CHUNK = 1 << 24


class StateError(ValueError):
    """A state file that cannot be trusted: missing, truncated, altered, or holding objects
    other than tensors and plain data. The message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class _HashingWriter(io.RawIOBase):
    """Write through to ``f``, hashing and counting what passes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch reports a failed write without its cause

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.sha.update(view)
        self.size += len(view)
        try:
            return self.f.write(view)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


class _Offset(io.RawIOBase):
    """``f`` seen from ``offset`` on: the payload after the header, for torch's reader."""

    def __init__(self, f: io.BufferedIOBase, offset: int) -> None:
        self.f, self.offset = f, offset
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos += self.offset
        return self.f.seek(pos, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def readinto(self, b: Any) -> int:
        return self.f.readinto(b)


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (tensors and plain data) to ``path`` atomically, its header last."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"\0" * HEADER)
        writer = _HashingWriter(f)
        try:
            # torch's stub wants IO[bytes]; torch.save needs only write and flush (its docs)
            torch.save(obj, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:  # the disk's own error (full, read-only), not torch's
                raise writer.error from None
            raise
        f.seek(0)
        f.write(b"%s %s %016d\n" % (MAGIC, writer.sha.hexdigest().encode(), writer.size))
        f.flush()
        os.fsync(f.fileno())


def load_state(path: str | os.PathLike) -> Any:
    """Read a state file written by :func:`save_state`, on the CPU; :class:`StateError` when
    it is missing, is not one, is truncated or altered, or holds anything but tensors and
    plain data (nothing in it is executed)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise StateError(path, f"cannot be read ({err.strerror or err})") from None
    with f:
        header = f.read(HEADER)
        parts = header.rstrip(b"\n").split(b" ")
        if (len(header) < HEADER or parts[0] != MAGIC or len(parts) != 3
                or not parts[2].isdigit()):
            raise StateError(path, "is not a histodistill state file (or its header is damaged)")
        digest, size = parts[1].decode(errors="replace"), int(parts[2])
        sha, seen = hashlib.sha256(), 0
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            seen += len(chunk)
        if seen != size:
            raise StateError(path, f"is truncated or extended ({seen} of {size} payload bytes)")
        if sha.hexdigest() != digest:
            raise StateError(path, "fails its checksum (the file was altered or damaged)")
        try:
            # torch's stub wants IO[bytes]; torch.load needs only read, readline, tell and seek
            return torch.load(_Offset(f, HEADER), map_location="cpu", weights_only=True)  # type: ignore[arg-type]
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f"a reference to {found.group(1)}" if found else "an object torch refuses"
            raise StateError(path, "holds objects other than tensors and plain data "
                             f"({what}); refused, nothing in it was run") from None
        except (RuntimeError, EOFError, ValueError) as err:
            raise StateError(path, f"cannot be decoded ({type(err).__name__})") from None


def load_input(path: str | os.PathLike, rule: str) -> Any:
    """A state file that ``rule`` wrote, read as another stage's input; a damaged or foreign
    one is an :class:`InputError` naming that rule, the file and how to rewrite it."""
    try:
        return load_state(path)
    except StateError as err:
        raise InputError(rule, err.path, f"{err.reason}; delete it and rerun rule {rule} to "
                         "write it again") from None


def load_resume(path: str | os.PathLike | None, key: str) -> dict[str, Any] | None:
    """A resume checkpoint (a state file, or a JSON file of finished runs) written under ``key``
    (the work's settings and inputs), or None when there is none to resume. One from other
    settings is ignored; a damaged or foreign one is logged by name, removed, and the work
    redone: resume state is never reused unverified and never fatal."""
    if path is None or not Path(path).exists():
        return None
    try:
        state = read_json(path, "resume") if str(path).endswith(".json") else load_state(path)
    except (StateError, InputError) as err:
        log.warning("resume state %s is damaged (%s); removed, redoing that work", path,
                    getattr(err, "reason", err))
        Path(path).unlink(missing_ok=True)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.info("checkpoint %s is from other settings or inputs; starting afresh", path)
        return None
    return state


class Checkpoint:
    """The resume file of one long loop (a distillation, a training run, a generator's
    training): written whole at each save, read back only when intact and written under the
    same ``key`` (the work's settings and inputs, :func:`load_resume`), removed once the
    output that supersedes it is written. ``path`` None: a loop that does not checkpoint."""

    def __init__(self, path: str | os.PathLike | None, key: str) -> None:
        self.path, self.key = (Path(path) if path else None), key

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is nothing (intact, of this key) to resume."""
        return load_resume(self.path, self.key)

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors and plain data) under this checkpoint's key."""
        if self.path is not None:
            save_state({**state, "key": self.key}, self.path)

    def remove(self) -> None:
        """Drop the file (its work is done)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _digest(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names, sizes and bytes)."""
    sha = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        sha.update(f"{f.relative_to(path).as_posix() if f != path else ''}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
    return sha.hexdigest()


class Pieces:
    """The finished pieces of a resumable job (one per slide, or per expert) in
    ``<out>.partial``. Each piece, file or directory, is sealed when written: a sidecar
    ``<piece>.sealed``, written last, holds its key (settings and inputs) and the SHA-256 of
    its contents. A rerun keeps a piece only when its seal holds the same key and its contents
    still match; an unsealed (unfinished), altered or truncated piece is logged by name,
    removed and redone. :meth:`finish` drops pieces no longer wanted and the seals, then
    renames the folder onto ``out``."""

    SUFFIX = ".sealed"

    def __init__(self, out: str | os.PathLike, *, resumable: str | None = None) -> None:
        """``resumable``: a glob of the entries that hold an unfinished piece's own resume state
        (per-slide distillation's ``*.ckpt``), kept when the job fails."""
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.resumable = resumable
        self.partial.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Pieces:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """A job that fails before finishing any piece leaves nothing to resume: its empty (or
        unsealed) folder goes; with a finished piece or resume state the folder stays for the
        rerun."""
        if exc_type is None or not self.partial.is_dir():
            return
        if any(self.partial.glob(f"*{self.SUFFIX}")):
            return
        if self.resumable is not None and any(self.partial.glob(self.resumable)):
            return
        remove_path(self.partial)

    def path(self, name: str) -> Path:
        return self.partial / name

    def _seal(self, name: str) -> Path:
        return self.partial / (name + self.SUFFIX)

    def done(self, name: str, key: str) -> bool:
        """Whether piece ``name`` is finished for ``key`` and intact; if not, it is removed."""
        piece, seal = self.path(name), self._seal(name)
        if not piece.exists() and not seal.exists():
            return False
        try:
            info = json.loads(seal.read_text())
            recorded = (info["key"], info["sha256"])
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("%s has no intact seal (unfinished or damaged); removed, redoing it", piece)
        else:
            if recorded[0] != key:
                log.info("%s is from other settings or inputs; redoing it", piece)
            elif not piece.exists():
                log.warning("%s is missing although sealed; redoing it", piece)
            elif _digest(piece) != recorded[1]:
                log.warning("%s differs from its seal (damaged: a file changed, truncated or "
                            "missing); removed, redoing it", piece)
            else:
                return True
        for path in (piece, seal):
            remove_path(path)
        return False

    def seal(self, name: str, key: str) -> None:
        """Mark piece ``name`` finished: its key and digest, written atomically, last."""
        with atomic_path(self._seal(name)) as tmp:
            tmp.write_text(json.dumps({"key": key, "sha256": _digest(self.path(name))}))

    def clear_stale(self, keep: set[str]) -> None:
        """Remove everything but the pieces in ``keep`` and their seals."""
        for entry in list(self.partial.iterdir()):
            if entry.name not in keep and entry.name.removesuffix(self.SUFFIX) not in keep:
                remove_path(entry)

    def finish(self, keep: set[str]) -> Path:
        """Keep only the pieces in ``keep``, rename the folder onto ``out``, then drop the seals
        (a kill before the rename leaves every finished piece sealed)."""
        self.clear_stale(keep)
        remove_path(self.out)
        os.replace(self.partial, self.out)
        for seal in self.out.glob(f"*{self.SUFFIX}"):
            seal.unlink()
        return self.out

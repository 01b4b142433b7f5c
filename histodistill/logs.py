"""Logging for rule entry points: everything (progress bars included) goes to the rule's log
file; bad input is reported as one clear line on the console as well, without a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from histodistill.config import ConfigError
from histodistill.io import WRITE_ERRORS, InputError, OutputError
from histodistill.memory import start_trimmer


@contextlib.contextmanager
def rule_logging(log_path: str | os.PathLike) -> Iterator[None]:
    """Send logging and stderr to ``log_path``; turn bad input, bad config and failed writes
    (read-only folder, full disk) into one line and exit code 1.
    Also starts the allocator trimmer, so memory does not grow with the job's length."""
    start_trimmer()
    console = sys.stderr
    try:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        log_file = open(log_path, "w", buffering=1)
    except OSError as err:  # the log folder itself cannot be written
        if err.errno not in WRITE_ERRORS:
            raise
        _one_line(_io_line(f"log file {log_path}", err), console, logged=False)
    with log_file:
        sys.stderr = log_file
        logging.basicConfig(level=logging.INFO, stream=log_file, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            yield
        except (InputError, ConfigError, OutputError) as err:
            _one_line(err, console)
        except OSError as err:  # a full disk or a refused file outside atomic_path
            if err.errno not in WRITE_ERRORS:
                raise
            _one_line(_io_line(err.filename or "a file of this job", err), console)
        finally:
            sys.stderr = console


def _io_line(name: str, err: OSError) -> str:
    """A failed write as the error line's text: the file, the system's reason and its cause."""
    return f"[io] {name}: {err.strerror} ({WRITE_ERRORS.get(err.errno or 0, 'write refused')})"


def _one_line(err: BaseException | str, console: TextIO, *, logged: bool = True) -> None:
    """Report ``err`` as one line on the console, and in the log unless there is none
    (``logged`` false: the log file itself could not be opened); exit with status 1."""
    if logged:
        logging.error("%s", err)
    print(f"histodistill error: {err}", file=console)
    raise SystemExit(1) from None

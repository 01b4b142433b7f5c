"""What the bench scripts share: running a script's own child mode for one measurement."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable


def child_result(script: str, main: Callable[[list[str]], None], argv: list[str],
                 fresh: bool) -> dict:
    """The JSON record a bench script's child mode prints last: from ``script`` run in a fresh
    process (peak memory and imports measured alone), or from its ``main`` called in this one
    (``--smoke``: seconds, no process start)."""
    if fresh:
        out = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True,
                             text=True).stdout
    else:
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            main(argv)
        out = buf.getvalue()
    return json.loads(out.strip().splitlines()[-1])

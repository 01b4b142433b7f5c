"""The ``histodistill`` command: the library's tools beside the Snakemake workflow.

``histodistill report [OUT]``, ``histodistill tables ...``, ``histodistill summary [FOLDER]``,
``histodistill budget ...``, ``histodistill schema-doc [--out FILE]``: each is its module's
``main`` (``--help`` on each).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "report": ("histodistill.report", "report.html of what has been built so far"),
    "tables": ("histodistill.tables", "results tables, the docs' table blocks, committed result files"),
    "summary": ("histodistill.summary", "where a dataset's results and figures are"),
    "budget": ("histodistill.distill.budget", "iteration counts that fill a distillation budget"),
    "schema-doc": ("histodistill.schema_doc", "the configuration reference (docs/configuration.md)"),
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv[0]`` to its module's ``main`` with the rest of the arguments."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        listing = "\n".join(f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items())
        sys.exit(f"usage: histodistill COMMAND [ARGS]\ncommands:\n{listing}")
    module = importlib.import_module(COMMANDS[args[0]][0])
    module.main(args[1:])


if __name__ == "__main__":
    main()

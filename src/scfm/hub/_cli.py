"""``scfm releases`` and ``scfm fetch``: the catalogue's command-line interface.

:func:`add_subparsers` registers the commands on ``scfm``'s subparsers and :func:`run` executes
one. Nothing heavy is imported until a command runs (``scfm --help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_subparsers", "run"]


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``releases`` and ``fetch`` on ``scfm``'s subparsers."""
    p = subparsers.add_parser(
        "releases",
        help="list the released checkpoints scfm can fetch",
        description="List every release in scfm's catalogue: model class, host, files, size, "
        "checksums, licence and the from_pretrained options it needs.",
    )
    p.add_argument("--model", help="only the releases of this class (e.g. CellFM)")
    p.add_argument(
        "--long", action="store_true", help="also show files, titles, papers and options"
    )
    p.set_defaults(_hub_command="releases")

    f = subparsers.add_parser(
        "fetch",
        help="download a release into the scfm cache",
        description="Download a release (see `scfm releases`) into the scfm cache, verify it "
        "and print its folder. Interrupted downloads resume. The cache is SCFM_CACHE or the "
        "platform cache folder (~/.cache/scfm on Linux).",
    )
    f.add_argument("name", help="release name, e.g. geneformer-v2-104m")
    f.add_argument("--cache-dir", help="cache folder (default: $SCFM_CACHE or ~/.cache/scfm)")
    f.add_argument("--force", action="store_true", help="download again even if cached")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(_hub_command="fetch")


def run(args: argparse.Namespace) -> int:
    """Execute the ``releases`` or ``fetch`` command parsed into ``args``; returns 0."""
    command = getattr(args, "_hub_command", None) or getattr(args, "command", None)
    if command == "releases":
        from scfm.hub._catalogue import releases

        table = releases(model=args.model)
        if table.empty:
            print(f"No releases for model {args.model!r}.")
            return 0
        columns = ["model", "size", "checksums", "commercial_use", "host"]
        if args.long:
            columns = [
                "model",
                "title",
                "size",
                "files",
                "checksums",
                "licence",
                "paper",
                "options",
                "host",
            ]
        import pandas as pd

        with pd.option_context("display.max_colwidth", 80, "display.width", 200):
            print(table[columns].to_string())
        return 0
    if command == "fetch":
        from scfm.hub._download import fetch

        quiet = bool(getattr(args, "quiet", False))
        path = fetch(args.name, args.cache_dir, progress=not (args.no_progress or quiet))
        print(path)
        return 0
    print(f"unknown command {command!r}", file=sys.stderr)
    return 2

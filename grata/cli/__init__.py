"""The `grata` command line: one module per verb, each a thin layer over the library.

Every verb module exposes ``register(subparsers) -> {name: handler(args) -> int}``; it
imports what it uses at the top, except torch and the modules built on it (training, the
export), which its handler imports, so ``--help`` and the device need no torch. Adding a
verb is one line in VERBS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from grata import __version__
from grata.errors import GrataError

VERBS: tuple[str, ...] = ("synth", "train_source", "export", "adapt", "serve", "report",
                          "bench", "calibrate")


COMMANDS: dict = {}  # verb name -> handler(args) -> exit code, filled by build_parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb (registering the verbs' handlers in COMMANDS)."""
    p = argparse.ArgumentParser(
        prog="grata", description="Test-time adaptation (GraTa) of optic disc/cup "
        "segmentation on the device. Run 'grata COMMAND --help' for each command.")
    p.add_argument("--version", action="version", version=f"grata-edge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        COMMANDS.update(importlib.import_module(f"{__name__}.{verb}").register(sub))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="grata: %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except GrataError as exc:
        print(f"grata {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grata {args.command}: interrupted; finished domains are in the report",
              file=sys.stderr)
        return 130

"""The ``cai`` command: argument parsing only; every subcommand calls the core."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cai import __version__
from cai.commands import MODULES
from cai.errors import CaiError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai", description="AstroMAE galaxy redshifts on a laptop or on AWS Lambda.")
    parser.add_argument("--version", action="version", version=f"cai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"cai.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("cai.events").setLevel(logging.WARNING)  # per-partition JSON is for CloudWatch
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CaiError as exc:
        print(f"cai {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk: the path says what to fix
        where = f" {exc.filename}" if exc.filename else ""
        print(f"cai {args.command}: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cai {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

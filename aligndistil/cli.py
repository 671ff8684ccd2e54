"""``aligndistil`` — one console command, subcommands contributed by each package.

Each package's ``cli`` module exposes ``register(subparsers)``, which adds its subcommands
with argparse and sets ``func`` on each. Those modules import nothing heavy at import time
(no torch), so ``aligndistil --help`` is instant; a handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Packages that contribute subcommands, in help order.
SUBCOMMAND_MODULES = ("storage.cli", "teacher_service.cli", "student_trainer.cli",
                      "student_trainer.toyworld.cli", "aligndistil.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligndistil",
        description="AlignDistil: token-level distillation towards a teacher built from a DPO "
                    "model and a reverse-DPO model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

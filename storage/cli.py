"""Subcommands of this package for the ``aligndistil`` command (see ``aligndistil.cli``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules lazily."""

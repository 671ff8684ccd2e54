"""Subcommands of this package for the ``aligndistil`` command (see ``aligndistil.cli``)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules lazily."""
    p = subparsers.add_parser(
        "inspect", help="summarise, show or verify a target store",
        description="Summarise a target store (examples, tokens, bytes, k, teachers, "
                    "completeness per worker), print one record, or verify every checksum.")
    p.add_argument("store", metavar="STORE", help="path of the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--example", type=int, metavar="I",
                   help="print the record at store position I (0-based) as JSON")
    p.add_argument("--example-index", type=int, metavar="J",
                   help="print the record whose example_index (source row) is J")
    p.add_argument("--verify", action="store_true",
                   help="recompute all checksums; exit 1 naming every bad shard")
    p.add_argument("--stats", action="store_true",
                   help="the distributions of the targets: alpha (and its share at either "
                        "end), TVD between the teachers, pi*'s top-1 probability, kept and "
                        "tail mass, contrastive reward per token, response lengths")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw those distributions' histograms into FILE.png (implies --stats)")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from storage.errors import UserError
    from storage.store import TargetStore, format_summary, summarize, verify_store

    # Errors reach aligndistil's entry point (a UserError: one line, exit status 2).
    if args.verify:
        report = verify_store(args.store)
        if args.json:
            print(json.dumps({"ok": report.ok, "checked_shards": report.checked_shards,
                              "bad": report.bad}))
        else:
            for name, problems in report.bad.items():
                for problem in problems:
                    print(f"BAD {name}: {problem}")
            print(f"{'ok' if report.ok else 'FAILED'}: {report.checked_shards} shard(s) "
                  f"checked, {len(report.bad)} bad")
        return 0 if report.ok else 1
    store = TargetStore.open(args.store)
    if args.example is not None or args.example_index is not None:
        try:
            position = (args.example if args.example is not None
                        else store.position_of(args.example_index))
        except KeyError as exc:
            raise UserError(exc.args[0] if exc.args else str(exc)) from None
        if not 0 <= position < len(store):
            raise UserError(f"example {position} out of range: the store has "
                             f"{len(store)} examples")
        record = store[position]
        print(json.dumps(record.to_dict(), indent=None if args.json else 1))
        return 0
    if args.stats or args.plot:
        return _stats(store, args)
    summary = summarize(store)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _stats(store, args: argparse.Namespace) -> int:
    from pathlib import Path

    from storage.errors import UserError
    from storage.store.stats import format_stats, plot_stats, target_arrays, target_stats

    if args.plot:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png":
            raise UserError(f"--plot {plot}: expected a .png file name")
        if not plot.parent.is_dir():
            raise UserError(f"--plot {plot}: folder {plot.parent} does not exist")
        if plot.resolve().is_relative_to(Path(args.store).resolve()):
            raise UserError(f"--plot {plot}: inside the store; write it elsewhere")
    arrays = target_arrays(store)
    stats = target_stats(store, arrays)
    print(json.dumps(stats) if args.json else format_stats(stats))
    if args.plot:
        path = plot_stats(arrays, stats, args.plot)
        if not args.json:
            print(f"plot: {path}")
    return 0

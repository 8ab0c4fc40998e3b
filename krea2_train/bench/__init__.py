"""``krea2 bench ...``: every benchmark behind one command, results as one table.

A benchmark module defines ``add_arguments(parser)`` and ``run(args) -> list[dict]``, each row
``{"bench", "metric", "value", "unit", "target", "met"}``. ``krea2 bench all`` runs every CPU
benchmark with its defaults.
"""

from __future__ import annotations

import argparse
import importlib
import json

# subcommand -> benchmark modules it runs
BENCHES: dict[str, list[str]] = {
    "data": ["krea2_train.bench.data_store", "krea2_train.bench.data_loader"],
    "train": ["krea2_train.bench.train"],
    "ckpt": ["krea2_train.bench.ckpt"],
    "mttr": ["krea2_train.bench.mttr"],
}


def format_table(rows: list[dict]) -> str:
    header = ["bench", "metric", "value", "unit", "target", "met"]
    cells = [header] + [
        [
            str(row.get("bench", "")),
            str(row.get("metric", "")),
            f"{row['value']:.4g}" if isinstance(row.get("value"), float) else str(row.get("value", "")),
            str(row.get("unit", "")),
            str(row.get("target") or ""),
            {True: "yes", False: "NO", None: ""}[row.get("met")],
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _modules(name: str) -> list:
    return [importlib.import_module(module) for module in BENCHES[name]]


def run_bench(args: argparse.Namespace) -> int:
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    rows: list[dict] = []
    for name in names:
        for module in _modules(name):
            module_args = args
            if args.bench == "all":
                parser = argparse.ArgumentParser()
                module.add_arguments(parser)
                module_args = parser.parse_args([])
            rows.extend(module.run(module_args))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: " + ", ".join([*BENCHES, "all"]))
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCHES:
        sub = benches.add_parser(name, help=f"{name} benchmarks")
        sub.add_argument("--json", default=None, help="also write the rows as JSON")
        for module in _modules(name):
            module.add_arguments(sub)
        sub.set_defaults(func=run_bench)
    everything = benches.add_parser("all", help="every CPU benchmark with its defaults, one table")
    everything.add_argument("--json", default=None)
    everything.set_defaults(func=run_bench)

"""``krea2 bench ...``: every benchmark behind one command, results as one table.

A benchmark module defines ``add_arguments(parser)`` and ``run(args) -> list[dict]``, each row
``{"bench", "metric", "value", "unit", "target", "met"}``. ``krea2 bench all`` runs every CPU
benchmark with its defaults (the train benchmark on the CPU even where a GPU exists), prints each
one's rows as it finishes, goes on past a benchmark that fails, and ends with one table of every
result and the failures, if any (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from types import ModuleType

from krea2_train.arguments import help_text
from krea2_train.errors import ArgumentParser

# subcommand -> benchmark modules it runs
BENCHES: dict[str, list[str]] = {
    "data": ["krea2_train.bench.data_store", "krea2_train.bench.data_loader", "krea2_train.bench.data_balance"],
    "train": ["krea2_train.bench.train"],
    "ckpt": ["krea2_train.bench.ckpt"],
    "mttr": ["krea2_train.bench.mttr"],
}
BENCH_HELP: dict[str, str] = {
    "data": "queue claims and upserts on PostgreSQL, the shard loader's rate, balanced selection",
    "train": "one training step's images/s, tokens/s, TFLOP/s, MFU and memory; --reference diffusers compares",
    "ckpt": "how long a checkpoint blocks training against its full write time, and restore time",
    "mttr": "SIGKILL a rank of a 2-process run and time the restart to its first step, tiny and ~100M models (about 4 min)",
}
# the command-line options `krea2 bench all` gives a benchmark module, on top of its defaults
ALL_OPTIONS: dict[str, list[str]] = {"krea2_train.bench.train": ["--device", "cpu"]}


def bench_row(bench: str, metric: str, value, unit: str, target: str | None = None, met: bool | None = None) -> dict:
    """One result row (see the module docstring)."""
    return {"bench": bench, "metric": metric, "value": value, "unit": unit, "target": target, "met": met}


LONG_TEXT = 40  # a text value longer than this (a run's setup) goes below the table, not in its column


def format_table(rows: list[dict]) -> str:
    header = ["bench", "metric", "value", "unit", "target", "met"]
    long_texts = [row for row in rows if isinstance(row.get("value"), str) and len(row["value"]) > LONG_TEXT]
    cells = [header] + [
        [
            str(row.get("bench", "")),
            str(row.get("metric", "")),
            f"{row['value']:.4g}" if isinstance(row.get("value"), float) else "(below)" if row in long_texts else str(row.get("value", "")),
            str(row.get("unit", "")),
            str(row.get("target") or ""),
            {True: "yes", False: "NO", None: ""}[row.get("met")],
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"{row.get('bench', '')} {row.get('metric', '')}: {row['value']}" for row in long_texts]
    return "\n".join(lines)


def module_main(module_name: str, argv: list[str] | None = None) -> int:
    """``python -m krea2_train.bench.MODULE [options]``: one benchmark module alone, as a table."""
    module = importlib.import_module(module_name)
    parser = ArgumentParser(prog=f"python -m {module_name}", description=help_text(module.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    print(format_table(module.run(parser.parse_args(argv))))
    return 0


def _modules(name: str) -> list:
    return [importlib.import_module(module) for module in BENCHES[name]]


def _write_json(rows: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(rows, handle, indent=2)


def all_suite_args(module: ModuleType) -> argparse.Namespace:
    """A benchmark module's defaults, plus what ``ALL_OPTIONS`` sets for it."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(ALL_OPTIONS.get(module.__name__, []))


def run_all(args: argparse.Namespace) -> int:
    """Every benchmark module in turn; a failure is reported and the next one runs. 1 if any failed."""
    rows: list[dict] = []
    failures: list[tuple[str, BaseException]] = []
    for module_name in (module_name for names in BENCHES.values() for module_name in names):
        try:
            module = importlib.import_module(module_name)  # a module that does not import fails alone
            module_rows = module.run(all_suite_args(module))
        except (Exception, SystemExit) as error:  # SystemExit: arguments argparse refused, a module that exits
            traceback.print_exc()  # now, with the traceback; the summary at the end names it again
            failures.append((module_name, error))
            continue
        print(format_table(module_rows), end="\n\n", flush=True)
        rows.extend(module_rows)
    print(format_table(rows))
    _write_json(rows, args.json)
    for name, error in failures:
        print(f"FAILED {name}: {type(error).__name__}: {error}", file=sys.stderr)
    return 1 if failures else 0


def run_bench(args: argparse.Namespace) -> int:
    if args.bench == "all":
        return run_all(args)
    rows = [row for module in _modules(args.bench) for row in module.run(args)]
    print(format_table(rows))
    _write_json(rows, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: " + ", ".join([*BENCHES, "all"]))
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCHES:
        # modules of one subcommand may share an option (data_store's and data_balance's --dsn): one flag
        sub = benches.add_parser(name, help=BENCH_HELP[name], description=BENCH_HELP[name], conflict_handler="resolve")
        sub.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
        for module in _modules(name):
            module.add_arguments(sub)
        sub.set_defaults(func=run_bench)
    everything_help = ("every CPU benchmark (data, train on CPU, ckpt, mttr) with its defaults, one table; exit status 1 if "
                       "any failed (mttr alone takes about 4 minutes on 2 cores)")
    everything = benches.add_parser("all", help=everything_help, description=everything_help)
    everything.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    everything.set_defaults(func=run_bench)

"""``krea2 runs report RUN``: a run's MTBF, MTTR, goodput and failures, from its run log."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from krea2_train.errors import UsageError
from krea2_train.train.checkpoint import CHECKPOINTS_DIR, committed_checkpoints, read_manifest, resolve_run_dir
from krea2_train.train.metrics import read_metrics
from krea2_train.train.runlog import checkpoint_interval_advice, database_events, format_report, read_events, summarize


def events_from_database(dsn: str | None, runs_root: str, run_name: str) -> list[dict]:
    """The run's events from PostgreSQL: the server ``dsn`` names (read only: no migration, so a
    read-only role can report), else the embedded store under ``runs_root``."""
    from krea2_train.store.db import check_reachable, connection_kwargs, default_store_dir, resolve_dsn

    dsn, store_dir = resolve_dsn(dsn), default_store_dir(runs_root)
    if dsn is not None:
        import psycopg

        check_reachable(dsn, connect_timeout_s=5)  # StoreUnavailable names the server
        with psycopg.connect(dsn, **connection_kwargs(5)) as conn:
            return database_events(conn, run_name)
    if not store_dir.is_dir():
        raise UsageError(f"runs report --from-db: no DSN (--dsn or $KREA2_PG_DSN) and no embedded store at {store_dir}")
    from krea2_train.store import open_store

    with open_store(None, store_dir) as store, store.pool.connection() as conn:
        return database_events(conn, run_name)


def interval_advice(run_dir: Path, summary: dict, steps: list[dict]) -> dict | None:
    """:func:`checkpoint_interval_advice` from the run's committed checkpoints (the medians of
    their blocked and write times), its step times (median) and its recorded interval."""
    from omegaconf import OmegaConf

    manifests = [read_manifest(path) for path in committed_checkpoints(run_dir / CHECKPOINTS_DIR).values()]
    if not manifests or not (run_dir / "config.yaml").is_file():
        return None
    interval = int(OmegaConf.load(run_dir / "config.yaml").checkpoint.interval)
    step_s = statistics.median(float(record.get("step_time_s", 0.0)) for record in steps)
    return checkpoint_interval_advice(
        summary["mtbf_s"], len(summary["failures"]), step_s,
        statistics.median(m["blocked_s"] for m in manifests), statistics.median(m["write_s"] for m in manifests), interval,
    )  # fmt: skip


def report(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run, args.runs_root)
    if args.from_db:
        run_name = run_dir.name if run_dir is not None else args.run
        events = events_from_database(args.dsn, args.runs_root, run_name)
    elif run_dir is None:
        raise UsageError(f"{args.run!r} is neither a run directory nor a run under {args.runs_root}/")
    else:
        events = read_events(run_dir)
    if not events:
        raise UsageError(f"no run log events for {args.run!r}")
    steps = read_metrics(run_dir) if run_dir is not None else []
    summary = summarize(events, steps)
    if run_dir is not None and steps:
        summary["checkpoint_interval"] = interval_advice(run_dir, summary, steps)
    print(format_report(str(run_dir or args.run), summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser("runs", help="run accounting: failures, MTBF, MTTR, goodput")
    commands = runs.add_subparsers(dest="runs_command", metavar="COMMAND", required=True)
    parser = commands.add_parser("report", help="MTBF, MTTR, goodput and the failures of a run")
    parser.add_argument("run", help="a run directory, or a run name under --runs-root")
    parser.add_argument("--runs-root", default="runs", help="where run names are looked up (default: runs)")
    parser.add_argument("--from-db", action="store_true",
                        help="read the events from PostgreSQL instead of runlog.jsonl (step times, for goodput, still come "
                             "from the run directory's metrics.jsonl when --runs-root finds it)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN for --from-db (default: $KREA2_PG_DSN)")
    parser.add_argument("--json", default=None, help="also write the summary as JSON to this path")
    parser.set_defaults(func=report)

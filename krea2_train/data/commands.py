"""`krea2 data ...`: ingest, ingest-pairs, work, pack-target, pack-pairs, embed-target, status,
shapes, balance, curate, filter.

Every subcommand that needs the store takes ``--dsn`` (default ``$KREA2_PG_DSN``); without one it
starts the embedded server under ``--data-dir`` and stops it on exit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from krea2_train.arguments import positive_int
from krea2_train.data.shards import IMAGE_FORMATS
from krea2_train.errors import UsageError
from krea2_train.store.db import STORE_DIR_ENV, default_store_dir


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset registry, processing jobs, the shapes world")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    ingest = commands.add_parser("ingest", help="register images and captions of a dataset")
    _store_arguments(ingest)
    ingest.add_argument("--dataset", required=True, help="dataset name (created when new)")
    source = ingest.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="folder of NAME.png|jpg|webp + NAME.txt [+ NAME.json]")
    source.add_argument("--parquet", type=Path, help="parquet file with a uri column and caption columns")
    source.add_argument("--uris", type=Path, help="text file, one image path or file:// URI a line")
    ingest.set_defaults(func=cmd_ingest)

    work = commands.add_parser("work", help="run processing-job workers until no work remains")
    _store_arguments(work)
    work.add_argument("--job", required=True, help="job name (decode, filters, dedup, pack, ...)")
    work.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    work.add_argument("--batch", type=positive_int, default=None, help="rows per claim (default: the job's)")
    work.add_argument("--follow", action="store_true", help="keep polling for new work until SIGTERM/SIGINT")
    work.add_argument("--dataset", action="append", default=None, dest="datasets", metavar="NAME",
                      help="work on this dataset's images only (repeatable; default: every dataset's)")
    work.set_defaults(func=cmd_work)

    target = commands.add_parser("pack-target", help="have `work --job pack` pack a dataset at a resolution (training runs use it)")
    _pack_arguments(target)
    target.set_defaults(func=cmd_pack_target)

    pairs = commands.add_parser("ingest-pairs", help="register human preference pairs (prompt, winner, loser) for stage/stpo_human")
    _store_arguments(pairs)
    pairs.add_argument("--dataset", required=True, help="dataset name (created when new)")
    pairs.add_argument("--pairs", type=Path, required=True,
                       help="a .jsonl or .parquet file with prompt, winner and loser (paths relative to the file, or file:// URIs)")
    pairs.set_defaults(func=cmd_ingest_pairs)

    pack_pairs = commands.add_parser("pack-pairs", help="decode and pack a dataset's preference pairs into shards of pairs, now")
    _pack_arguments(pack_pairs)
    pack_pairs.set_defaults(func=cmd_pack_pairs)

    embed = commands.add_parser("embed-target", help="have `work --job embed` embed a dataset's images (for balance), on GPUs")
    _store_arguments(embed)
    embed.add_argument("--dataset", required=True)
    embed.add_argument("--embedder", required=True,
                       help="'small', or a local SigLIP/DINO transformers directory that every worker node reads at the same path")
    embed.add_argument("--remove", action="store_true",
                       help="stop embedding with it (e.g. a model the workers cannot load); rows it made fail run again")
    embed.set_defaults(func=cmd_embed_target)

    status = commands.add_parser("status", help="row counts per dataset and per job and state")
    _store_arguments(status)
    status.add_argument("--errors", type=positive_int, nargs="?", const=20, default=0, metavar="N",
                        help="also list up to N (default 20) undecodable images and dead jobs, with their errors")
    status.set_defaults(func=cmd_status)

    shapes = commands.add_parser("shapes", help="write a shapes-world dataset in the ingest folder format")
    shapes.add_argument("--out", type=Path, required=True, help="output folder")
    shapes.add_argument("--n", type=positive_int, required=True, help="number of samples")
    shapes.add_argument("--resolution", type=positive_int, default=64, help="square side in pixels (default 64)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--aspect-ratios", nargs="*", default=None, help="e.g. 1 4:3 16:9")
    shapes.add_argument("--pairs", action="store_true",
                        help="write preference pairs (a winner, and a loser with one shape recoloured) and their pairs.jsonl")
    shapes.set_defaults(func=cmd_shapes)

    from krea2_train.curate.balance import add_selection_commands

    add_selection_commands(commands, _store_arguments, _open)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default $KREA2_PG_DSN; else embedded)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_store_dir(),
        help=f"embedded server's directory when no DSN is set (default ${STORE_DIR_ENV} or runs/_store, "
        "where training runs under the default runs_root find it)",
    )


def _pack_arguments(parser: argparse.ArgumentParser) -> None:
    _store_arguments(parser)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--resolution", type=int, required=True,
                        help="image side in pixels: the run's data.resolution with the Qwen-Image VAE")
    parser.add_argument("--out", type=Path, required=True, help="shard directory (shared storage that every node reads)")
    parser.add_argument("--buckets", nargs="+", default=None, help="aspect ratios (default: all nine, as configs/data/registry.yaml)")
    parser.add_argument("--pixel-multiple", type=positive_int, default=16, help="16 for the Qwen-Image VAE with patch 2 (default)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="image encoding in the shards")
    parser.add_argument("--shard-size", type=positive_int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (shuffles within a packed batch)")


def _pack_settings(args, command: str):
    from krea2_train.data.pack import PackSettings

    if args.pixel_multiple > 0 and (args.resolution <= 0 or args.resolution % args.pixel_multiple):
        raise UsageError(f"{command}: --resolution must be a positive multiple of --pixel-multiple ({args.pixel_multiple}), got {args.resolution}")
    try:
        return PackSettings(pixel_multiple=args.pixel_multiple, image_format=args.format, shard_size=args.shard_size, seed=args.seed,
                            **({"aspect_ratios": tuple(args.buckets)} if args.buckets else {}))
    except ValueError as error:
        raise UsageError(f"{command}: {error}") from None


def _open(args):
    from krea2_train.store import open_store

    return open_store(args.dsn, args.data_dir)


def cmd_ingest(args) -> int:
    from krea2_train.data.ingest import ingest

    with _open(args) as store:
        report = ingest(store, args.dataset, folder=args.folder, parquet=args.parquet, uris=args.uris)
    print(
        f"dataset {report.dataset} (id {report.dataset_id}): {report.rows} rows, {report.inserted} inserted,"
        f" {report.updated} updated, {report.unchanged} unchanged"
    )
    if report.uncaptioned:
        print(
            f"krea2: warning: {report.uncaptioned} of {report.rows} images have no long caption (no NAME.txt, no"
            f" captions.long in NAME.json, no caption_long column), e.g. {report.uncaptioned_example}: they are"
            " registered but never packed, so no training run reads them",
            file=sys.stderr,
        )
    return 0


ALL_FAILED_EXIT = 3  # `data work`'s exit code when its workers failed on every row they claimed


def worker_main(dsn: str, job_name: str, batch: int | None, follow: bool, datasets: list[str] | None = None) -> dict:
    """One worker: open the store by DSN, run the job until done (or stopped by SIGTERM/SIGINT),
    on ``datasets``' images only when given."""
    from krea2_train.curate.jobs import load_jobs
    from krea2_train.store import open_store
    from krea2_train.store.queue import get_job, run_worker

    load_jobs()
    job = get_job(job_name)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    with open_store(dsn) as store:
        stats = run_worker(store, job, batch_size=batch, follow=follow, stop=stop, datasets=datasets)
    return asdict(stats)


def _worker_process(
    dsn: str, job_name: str, batch: int | None, follow: bool, gpu: str | None = None, datasets: list[str] | None = None,
    results=None,
) -> dict:
    """Run one worker (see :func:`worker_main`) and print its stats; returns them, and puts them
    on ``results`` (a queue to the parent) when given."""
    from krea2_train.logs import setup_logging

    if gpu is not None:  # before anything initialises CUDA in this (spawned) process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    setup_logging(label=f"worker {os.getpid()}", stream=sys.stderr, force=False)  # a spawned process starts bare
    stats = worker_main(dsn, job_name, batch, follow, datasets)
    print(f"worker {os.getpid()}: {stats}", flush=True)
    if results is not None:
        results.put(stats)
    return stats


def work_exit_code(stats: list[dict]) -> int:
    """ALL_FAILED_EXIT when the workers' rows failed and not one completed (a handler that fails
    on everything: a broken install or setting, not bad images), else 0."""
    completed, failed = sum(s["completed"] for s in stats), sum(s["failed"] for s in stats)
    if failed and not completed:
        print(f"every row the workers claimed failed ({failed} attempts); `krea2 data status --errors` lists the errors",
              file=sys.stderr, flush=True)
        return ALL_FAILED_EXIT
    return 0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry for entry in visible.split(",") if entry.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def worker_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The GPU of each of ``workers`` worker processes: round-robin over ``gpus``; None (leave
    the environment as it is) when there are none."""
    return [gpus[index % len(gpus)] if gpus else None for index in range(workers)]


def cmd_work(args) -> int:
    from krea2_train.curate.jobs import load_jobs
    from krea2_train.store.queue import get_job

    load_jobs()
    get_job(args.job)  # an unknown job fails here, naming the registered ones
    with _open(args) as store:
        if args.datasets:
            from krea2_train.store.db import find_dataset_id

            with store.pool.connection() as conn:
                for name in args.datasets:  # an unknown one fails here, naming the registered ones
                    find_dataset_id(conn, name)
        hints = {
            "pack": ("pack_targets", "`krea2 data pack-target --dataset NAME --resolution PX --out DIR` adds one "
                                     "(a training run adds its own on first start)"),
            "embed": ("embed_targets", "`krea2 data embed-target --dataset NAME --embedder MODEL_DIR` adds one"),
        }
        if args.job in hints:
            table, hint = hints[args.job]
            with store.pool.connection() as conn:
                if conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0:
                    print(f"no {args.job} target yet: {hint}", file=sys.stderr)
        if args.workers == 1:
            return work_exit_code([_worker_process(store.dsn, args.job, args.batch, args.follow, None, args.datasets)])
        context = multiprocessing.get_context("spawn")
        results = context.SimpleQueue()
        gpus = worker_gpus(args.workers, visible_gpus() if get_job(args.job).uses_gpu else [])
        processes = [
            context.Process(target=_worker_process, args=(store.dsn, args.job, args.batch, args.follow, gpu, args.datasets, results))
            for gpu in gpus
        ]
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            for process in processes:
                process.terminate()
                process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        print(f"{len(failed)} worker(s) exited with codes {failed}", file=sys.stderr)
        return 1
    return work_exit_code([results.get() for _ in processes])


def cmd_pack_target(args) -> int:
    from krea2_train.data.pack import add_pack_target

    settings = _pack_settings(args, "pack-target")
    with _open(args) as store:
        add_pack_target(store, args.dataset, args.resolution, args.out, settings)
    print(f"pack target: {args.dataset} at {args.resolution} px into {args.out.resolve()} "
          f"(buckets {', '.join(settings.aspect_ratios)}); `krea2 data work --job pack` packs it once the decode and dedup jobs have run")
    return 0


def cmd_ingest_pairs(args) -> int:
    from krea2_train.data.pairs import ingest_pairs

    with _open(args) as store:
        report = ingest_pairs(store, args.dataset, args.pairs)
    print(f"dataset {report.dataset}: {report.pairs} pairs of {report.images} images, {report.inserted} new pairs;"
          " `krea2 data pack-pairs` packs them, or a stage/stpo_human run with data.source=registry does")
    return 0


def cmd_pack_pairs(args) -> int:
    from krea2_train.curate.jobs import load_jobs
    from krea2_train.data.pairs import pack_pairs
    from krea2_train.store.queue import get_job, run_worker

    settings = _pack_settings(args, "pack-pairs")
    with _open(args) as store:
        load_jobs()
        run_worker(store, get_job("decode"), datasets=[args.dataset])
        report = pack_pairs(store, args.dataset, [args.resolution], args.out, settings)
    print(f"packed {report.num_samples} new pairs of {args.dataset} at {args.resolution} px into {len(report.shards)} shards under {args.out.resolve()}")
    for pair_id, error in sorted(report.unreadable.items())[:5]:
        print(f"krea2: warning: pair {pair_id} not packed: {error}", file=sys.stderr)
    return 0


def cmd_embed_target(args) -> int:
    from krea2_train.curate.balance import add_embed_target, remove_embed_target
    from krea2_train.curate.embeddings import embedder_spec

    if args.remove:
        with _open(args) as store:
            removed = remove_embed_target(store, args.dataset, args.embedder)
        print(f"embed target {args.dataset} with {args.embedder}: " + ("removed; its dead embed rows are pending again"
                                                                        if removed else "there was none"))
        return 0
    embedder_spec(args.embedder)  # 'small' or a directory, before the store starts
    with _open(args) as store:
        add_embed_target(store, args.dataset, args.embedder)
    print(f"embed target: {args.dataset} with {args.embedder}; `krea2 data work --job embed` embeds its selectable images "
          "(one worker per GPU: CUDA_VISIBLE_DEVICES or srun --gpus-per-task=1), and `krea2 data balance` finds them done")
    return 0


def cmd_status(args) -> int:
    from krea2_train.data.pack import dataset_counts, pack_target_counts
    from krea2_train.data.pairs import pair_counts
    from krea2_train.logs import format_duration
    from krea2_train.store.queue import STATES, job_progress

    with _open(args) as store:
        datasets = dataset_counts(store)
        targets = pack_target_counts(store)
        pairs = pair_counts(store)
        progress = job_progress(store)
        undecodable, dead = _errors(store, args.errors) if args.errors else ([], [])
    columns = ("images", "packable", "undecoded", "undecodable", "duplicates", "no caption")
    width = max([24, *(len(d.name) for d in datasets), *(len(name) for name, *_ in targets)])  # selections' long names
    print(f"{'dataset':{width}} " + " ".join(f"{column:>11}" for column in columns))
    for d in datasets:
        values = (d.images, d.packable, d.unchecked, d.undecodable, d.duplicates, d.uncaptioned)
        print(f"{d.name:{width}} " + " ".join(f"{value:>11}" for value in values))
    if pairs:
        print(f"\n{'preference pairs':{width}} " + " ".join(f"{column:>11}" for column in ("pairs", "packable", "undecoded", "undecodable")))
        for p in pairs:
            print(f"{p.name:{width}} " + " ".join(f"{value:>11}" for value in (p.pairs, p.packable, p.undecoded, p.undecodable)))
    if targets:
        print(f"\n{'pack target':{width}} {'px':>6} {'kind':>6} {'packed':>11}  out")
        for name, resolution, out_dir, packed, kind in targets:
            print(f"{name:{width}} {resolution:>6} {kind:>6} {packed:>11}  {out_dir}")
    print()
    print(f"{'job':{width}} " + " ".join(f"{state:>10}" for state in STATES) + f" {'done/min':>10} {'eta':>10}")
    for job, job_state in progress.items():
        eta = "-" if job_state.eta_s is None else format_duration(job_state.eta_s)
        print(f"{job:{width}} " + " ".join(f"{job_state.counts[state]:>10}" for state in STATES)
              + f" {60 * job_state.rows_per_s:>10.0f} {eta:>10}")
    print("(done/min: over the last 5 minutes; eta: the pending and running rows at that rate)")
    if args.errors:
        print(f"\nundecodable images (first {args.errors}):" if undecodable else "\nno undecodable image")
        for uri, error in undecodable:
            print(f"  {uri}: {error}")
        print(f"dead jobs (first {args.errors}):" if dead else "no dead job")
        for job, uri, error in dead:
            print(f"  {job} {uri}: {error}")
    return 0


def _errors(store, limit: int) -> tuple[list[tuple], list[tuple]]:
    """(uri, decode error) of the first ``limit`` undecodable images and (job, uri, error) of the
    first ``limit`` dead job rows."""
    with store.pool.connection() as conn:
        undecodable = conn.execute(
            "SELECT uri, coalesce(decode_error, '') FROM images WHERE decode_ok = false ORDER BY id LIMIT %s", (limit,)
        ).fetchall()
        dead = conn.execute(
            "SELECT j.job, i.uri, coalesce(j.error, '') FROM job_runs j JOIN images i ON i.id = j.image_id"
            " WHERE j.state = 'dead' ORDER BY j.job, j.image_id LIMIT %s", (limit,)
        ).fetchall()
    return undecodable, dead


def cmd_shapes(args) -> int:
    from krea2_train.data.shapes import write_shapes_dataset, write_shapes_pairs

    if args.pairs:
        pair_file = write_shapes_pairs(args.out, args.n, args.resolution, args.seed, args.aspect_ratios)
        print(f"wrote {args.n} preference pairs to {args.out}; register them with krea2 data ingest-pairs --dataset shapes_pairs --pairs {pair_file}")
        return 0
    out = write_shapes_dataset(args.out, args.n, args.resolution, args.seed, args.aspect_ratios)
    print(f"wrote {args.n} samples to {out}")
    return 0

"""``torchrun [--nproc_per_node N] -m krea2_train --config stage/NAME [key=value ...]``.

Also ``python -m krea2_train ...`` for one process. ``--print-config`` shows the resolved config
and exits. Re-running the same command resumes from the run's newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    from krea2_train.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m krea2_train", description=__doc__.splitlines()[0])
    from krea2_train.config.load import CONFIG_DIR

    stages = ", ".join(sorted(path.stem for path in (CONFIG_DIR / "stage").glob("*.yaml")))
    parser.add_argument("--config", required=True,
                        help=f"a stage: stage/NAME ({stages}), or the path of a stage YAML file of your own")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (keys, types and values are checked; the stage's own "
                             "settings, e.g. grpo.group_size, are checked when a run starts)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: key=value or group=option")
    return parser.parse_args(argv)


def run_dir_of_overrides(overrides: list[str]) -> Path | None:
    """``runs_root/run_name`` as the overrides set them (the Slurm launcher always does), for a
    config that does not compose; None unless both are given."""
    values = dict(override.lstrip("+").split("=", 1) for override in overrides if "=" in override)
    if "runs_root" not in values or "run_name" not in values:
        return None
    return Path(values["runs_root"]) / values["run_name"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from krea2_train.errors import UsageError, clear_user_error, is_lasting_error, record_user_error, report_user_errors

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse printed why; a bad command line fails every restart alike
        if stop.code == 2 and is_main and (run_dir := run_dir_of_overrides(argv)) is not None:
            record_user_error(run_dir, UsageError(f"the command line does not parse: {' '.join(argv)} (python -m krea2_train --help: usage)"))
        raise
    from krea2_train.config import ConfigError, load_config, to_yaml

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        if is_main and (run_dir := run_dir_of_overrides(args.overrides)) is not None:
            record_user_error(run_dir, error)  # every restart would fail alike
        print(f"krea2_train: bad config: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        if is_main:
            print(to_yaml(config), end="")
        return 0

    from krea2_train.stages import StageConfigError
    from krea2_train.train.trainer import run

    run_dir = Path(config.runs_root) / config.run_name
    if is_main:  # this start decides afresh whether the run's error is lasting
        clear_user_error(run_dir)

    def train() -> int:
        try:
            result = run(config)
        except Exception as error:
            if is_lasting_error(error):  # a restart would fail alike: tell the launcher
                record_user_error(run_dir, error)
            if not isinstance(error, (StageConfigError, ConfigError)):  # ConfigError: settings that do not fit the world size
                raise
            print(f"krea2_train: bad config: {error}", file=sys.stderr)  # raised before any heavy work
            return 2
        if result.ending == "signal":  # a clean stop (exit 0: the launcher resumes it like any preempted job)
            print(f"stopped at step {result.step} of {result.steps} after a checkpoint; run the same command again to resume. "
                  f"run directory: {run_dir}")
        elif result.ending == "fenced":  # exit 0: a restart would be fenced again; the newer start goes on
            print(f"stopped without writing: a newer start of this run owns it (do not restart this one). run directory: {run_dir}")
        else:
            print(f"run directory: {run_dir}")
        return 0

    return report_user_errors("krea2_train", train)  # a corrupt checkpoint, a full disk: a message, not a traceback


if __name__ == "__main__":
    sys.exit(main())

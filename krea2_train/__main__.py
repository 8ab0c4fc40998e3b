"""``torchrun [--nproc_per_node N] -m krea2_train --config stage/NAME [key=value ...]``.

Also ``python -m krea2_train ...`` for one process. ``--print-config`` shows the resolved config
and exits. Re-running the same command resumes from the run's newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m krea2_train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="GROUP/NAME under configs/, e.g. stage/pretrain_256")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: key=value or group=option")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from krea2_train.config import ConfigError, load_config, to_yaml

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"krea2_train: bad config: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        if int(os.environ.get("RANK", "0")) == 0:
            print(to_yaml(config), end="")
        return 0

    from pathlib import Path

    from krea2_train.errors import is_lasting_error, record_user_error, report_user_errors
    from krea2_train.stages import StageConfigError
    from krea2_train.train.trainer import run

    def train() -> int:
        try:
            run_dir = run(config)
        except Exception as error:
            if is_lasting_error(error):  # a restart would fail alike: tell the launcher
                record_user_error(Path(config.runs_root) / config.run_name, error)
            if not isinstance(error, StageConfigError):
                raise
            print(f"krea2_train: bad config: {error}", file=sys.stderr)  # raised before any heavy work
            return 2
        print(f"run directory: {run_dir}")
        return 0

    return report_user_errors("krea2_train", train)  # a corrupt checkpoint, a full disk: a message, not a traceback


if __name__ == "__main__":
    sys.exit(main())

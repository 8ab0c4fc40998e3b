"""The `krea2` command.

Each concern owns its subcommands: a module listed in ``COMMAND_MODULES`` defines
``register(subparsers)``, which adds its parsers and sets ``func`` on each. Modules are imported
only when the command line names them, so `krea2 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from krea2_train.errors import ArgumentParser

# subcommand name -> module defining register(subparsers)
COMMAND_MODULES: dict[str, str] = {
    "demo": "krea2_train.train.demo",
    "sample": "krea2_train.train.sample",
    "data": "krea2_train.data.commands",
    "export": "krea2_train.train.commands",
    "average": "krea2_train.train.commands",
    "merge": "krea2_train.train.commands",
    "runs": "krea2_train.train.runs_command",
    "lora": "krea2_train.model.lora_commands",
    "bench": "krea2_train.bench",
}


# what `krea2 --help` says of each command, without importing its module (torch, diffusers...)
COMMAND_HELP: dict[str, str] = {
    "demo": "run the recipe chain on the shapes world on CPU",
    "sample": "generate images from a checkpoint",
    "data": "dataset registry, processing jobs, the shapes world",
    "export": "write a run's checkpoint in the diffusers or original layout",
    "average": "uniform average of a run's last K checkpoints (PMA)",
    "merge": "weighted average of checkpoints of one model config",
    "runs": "run accounting: failures, MTBF, MTTR, goodput",
    "lora": "export, convert and extract LoRAs; LoRA training memory",
    "bench": "benchmarks: data, train, ckpt, mttr, all",
}
DESCRIPTION = (
    "Krea 2 training framework. Training itself is `python -m krea2_train --config stage/NAME [key=value ...]` "
    "(torchrun, launch/local/train.sh or launch/slurm/ for several processes); these commands do the rest."
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``only``'s command (its module imported), or of the command list alone."""
    parser = ArgumentParser(prog="krea2", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only is None:
        for name, text in COMMAND_HELP.items():
            subparsers.add_parser(name, help=text, add_help=False)
        return parser
    importlib.import_module(COMMAND_MODULES[only]).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else None
    parser = build_parser(first if first in COMMAND_MODULES else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from krea2_train.errors import report_user_errors
    from krea2_train.logs import setup_logging

    # progress of long commands on stderr, so what a command prints stays its result (a training
    # run sets up its own logging)
    setup_logging(stream=sys.stderr, force=False)
    return report_user_errors("krea2", lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())

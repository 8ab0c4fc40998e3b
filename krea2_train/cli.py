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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="krea2", description="Krea 2 training framework")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = sorted(set(COMMAND_MODULES.values())) if only is None else [COMMAND_MODULES[only]]
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if only is not None or error.name != module_name:
                raise
            continue  # a concern not present in this build
        module.register(subparsers)
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

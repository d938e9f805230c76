"""The ``parcae`` console command's front door.

``parcae``, ``parcae --help`` and ``parcae --version`` are answered from the table below without importing torch or
transformers: importing the ``modeling_parcae`` package registers its classes with transformers, which loads both and
takes seconds. Anything naming a subcommand goes to :func:`modeling_parcae.cli.main`, which imports only what that
subcommand runs. The one-line help texts repeat those the subcommand modules register (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "Parcae looped language models on transformers."
COMMAND_HELP = {
    "generate": "generate text with an adjustable number of loops",
    "convert": "convert an official parcae_lm checkpoint to transformers (or back with --to official)",
    "push": "upload a converted directory (or convert an official SRC first)",
    "eval": "CORE / Core-Extended / bits-per-byte across loop depths (lm-eval)",
    "compare": "per-task and aggregate differences between two eval reports",
    "train": "train a model from a recipe YAML with Accelerate (works under `accelerate launch`)",
    "train-tokenizer": "train a byte-level BPE tokenizer in the official Parcae format",
    "path": "print the path of a bundled file: the demo model, the lm-eval tasks, a recipe, preset or accelerate config",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("parcae-transformers")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def overview_parser() -> argparse.ArgumentParser:
    """The top level only: the list of subcommands, ``--help`` and ``--version``."""
    parser = argparse.ArgumentParser(prog="parcae", description=DESCRIPTION,
                                     epilog="Run `parcae COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"parcae {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMAND_HELP.items():
        subparsers.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not any(arg in COMMAND_HELP for arg in argv):
        overview_parser().parse_args(argv)  # prints help, the version or a usage error, and exits
    from modeling_parcae.cli import main as run_subcommand

    return run_subcommand(argv)


if __name__ == "__main__":
    sys.exit(main())

"""The ``parcae`` command: parses arguments, then hands over to the module that owns each subcommand.

Each owner module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed ``argparse.Namespace``. Modules are imported lazily so ``parcae --help`` stays fast.
"""

import argparse
import importlib
import sys


SUBCOMMAND_MODULES = {
    "generate": "modeling_parcae.generation_cli",
    "convert": "modeling_parcae.conversion.cli",
    "push": "modeling_parcae.conversion.cli",
    "eval": "modeling_parcae.eval.cli",
    "compare": "modeling_parcae.eval.cli",
    "train": "modeling_parcae.training.cli",
    "train-tokenizer": "modeling_parcae.training.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parcae", description="Parcae looped language models on transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = dict.fromkeys(
        SUBCOMMAND_MODULES[only] if only in SUBCOMMAND_MODULES else m for m in SUBCOMMAND_MODULES.values()
    )
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(only=command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"parcae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

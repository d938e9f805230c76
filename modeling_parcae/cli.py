"""The ``parcae`` command: parses arguments, then hands over to the module that owns each subcommand.

Each owner module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed ``argparse.Namespace``. Modules are imported lazily so ``parcae --help`` stays fast.
"""

import argparse
import functools
import importlib
import sys

from modeling_parcae.extras import MissingExtraError, require_extra


SUBCOMMAND_MODULES = {
    "generate": "modeling_parcae.generation_cli",
    "convert": "modeling_parcae.conversion.cli",
    "push": "modeling_parcae.conversion.cli",
    "eval": "modeling_parcae.eval.cli",
    "compare": "modeling_parcae.eval.cli",
    "train": "modeling_parcae.training.cli",
    "train-tokenizer": "modeling_parcae.training.cli",
    "path": "modeling_parcae.bundled",
}
# Subcommands that need an extra of pyproject.toml (the core install loads, converts and generates only).
SUBCOMMAND_EXTRAS = {"eval": "eval", "compare": "eval", "train": "train", "train-tokenizer": "train"}


class HelpWithDefaults(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: positionals may follow options (``parcae train tiny-cpu --resume key=value``, which plain
    argparse refuses once an option has ended its first run of positionals), and an unknown option is reported with
    the subcommand's usage instead of being handed back to the top-level parser, which would show its own."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args parses through this method, once per pass
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parcae", description="Parcae looped language models on transformers.")
    parser.add_argument("--version", action="version", version=f"parcae {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=functools.partial(SubcommandParser,
                                                                      formatter_class=HelpWithDefaults))
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
    _hide_weight_loading_bar()
    try:
        if args.command in SUBCOMMAND_EXTRAS:
            require_extra(SUBCOMMAND_EXTRAS[args.command], f"parcae {args.command}")
        return int(args.func(args) or 0)
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        message = " ".join(str(error).split())  # one line, however the library formatted it
        print(f"parcae {args.command}: error: {message}", file=sys.stderr)
        return 2


def _hide_weight_loading_bar() -> None:
    """transformers draws a "Loading weights" bar on every model load: noise in a command that loads one model per
    call. Its switch turns the Hub's download bars off as well; those (minutes for a large checkpoint) stay as the
    user has them."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if hub_bars_shown:
        enable_progress_bars()


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (a value, a file, the disk), reported as one line with exit status 2.

    transformers' config validation raises huggingface_hub's ``StrictDataclassError`` and a damaged weights file
    ``SafetensorError``; neither is a ``ValueError``. Anything else is a bug and keeps its traceback.
    """
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from yaml import YAMLError

    return ValueError, OSError, StrictDataclassError, SafetensorError, YAMLError, MissingExtraError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("parcae-transformers")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from modeling_parcae import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())

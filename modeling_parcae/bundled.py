"""Files the package ships, by name: the demo model, the lm-eval task folder, recipes, presets and accelerate
configs. An installed user names them (``parcae generate --model demo``, ``--include_path "$(parcae path tasks)"``)
instead of digging through ``site-packages``; the checkout and an installed wheel answer alike.

``parcae path WHAT [NAME]`` prints one of these paths, for the shell.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

DEMO_MODEL_NAME = "demo"
# what `parcae path` knows by name: WHAT -> (folder in the installed configuration package, file suffix)
NAMED_FOLDERS = {"recipe": ("recipes", ".yaml"), "preset": ("presets", ".json"), "accelerate": ("accelerate", ".yaml")}


def _package_path(package: str, folder: str) -> Path:
    """A folder inside an installed package (``configuration/`` and ``eval/`` install as sub-packages)."""
    return Path(str(resources.files(package).joinpath(folder)))


def demo_model_path() -> Path:
    """The small Parcae model bundled with the package (``modeling_parcae/demo``), loadable with ``from_pretrained``."""
    path = _package_path("modeling_parcae", "demo")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"this installation carries no bundled demo model (no {path / 'config.json'})")
    return path


def eval_tasks_path() -> Path:
    """The folder of CORE / Core-Extended lm-eval task YAMLs, for ``lm_eval --include_path``."""
    return _package_path("modeling_parcae.eval", "tasks")


def named_file(what: str, name: str) -> Path:
    """A bundled recipe, preset or accelerate config by name (``named_file("accelerate", "cpu-2proc")``)."""
    folder, suffix = NAMED_FOLDERS[what]
    directory = _package_path("modeling_parcae.configuration", folder)
    path = directory / f"{name}{suffix}"
    if not path.is_file():
        available = sorted(p.name[: -len(suffix)] for p in directory.iterdir() if p.name.endswith(suffix))
        raise FileNotFoundError(f"no bundled {what} named {name!r}; available: {', '.join(available)}")
    return path


def model_path_or_name(name: str) -> str:
    """``demo`` means the bundled demo model unless a local path of that name exists; anything else is unchanged."""
    if name == DEMO_MODEL_NAME and not Path(name).exists():
        return str(demo_model_path())
    return name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "path",
        help="print the path of a bundled file: the demo model, the lm-eval tasks, a recipe, preset or accelerate config",
        description="Print where the installed package keeps a bundled file, e.g. "
                    "`lm_eval ... --include_path \"$(parcae path tasks)\"` or "
                    "`accelerate launch --config_file \"$(parcae path accelerate cpu-2proc)\" ...`.",
    )
    parser.add_argument("what", choices=["demo", "tasks", *NAMED_FOLDERS], help="which bundled file or folder")
    parser.add_argument("name", nargs="?", help="the recipe, preset or accelerate config name (e.g. tiny-cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.what in NAMED_FOLDERS:
        if not args.name:
            raise ValueError(f"parcae path {args.what} needs a NAME")
        print(named_file(args.what, args.name))
    elif args.name:
        raise ValueError(f"parcae path {args.what} takes no NAME")
    else:
        print(demo_model_path() if args.what == "demo" else eval_tasks_path())
    return 0

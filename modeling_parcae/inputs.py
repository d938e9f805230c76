"""Checks of values users type on the command line, shared by the subcommands so each mistake gets one clear message
before anything heavy runs: a device that is not there, a local path that does not exist (instead of the Hub's
"Repo id must be in the form ..."), a JSON file cut short."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet", ".yaml", ".safetensors", ".pt", ".bin")


def looks_local(name: str) -> bool:
    """True when ``name`` can only be meant as a local path: it exists, starts like a path, has a file suffix, or has
    a shape no Hub repo id has (ids are ``name`` or ``org/name``)."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES)
            or name.count("/") > 1 or "\\" in name)


def local_path_or_hub_id(name: str, what: str) -> str:
    """``name`` unchanged if it is an existing path or a plausible Hub repo id; else a ``FileNotFoundError`` saying
    that the path does not exist. ``what`` names the option in the message (e.g. ``--model``)."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{what}: path {name} does not exist")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def check_device(device: str) -> str:
    """Refuse a device this machine does not have (``cuda`` without CUDA, ``cuda:3`` with two GPUs, ``mps``...)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a device name ({error})") from None
    if parsed.type == "cpu":
        return device
    module = getattr(torch, parsed.type, None)
    available = module is not None and hasattr(module, "is_available") and module.is_available()
    if not available:
        raise ValueError(f"--device {device}: no {parsed.type} device is available on this machine (use --device cpu)")
    if parsed.index is not None and hasattr(module, "device_count") and parsed.index >= module.device_count():
        raise ValueError(f"--device {device}: this machine has {module.device_count()} {parsed.type} device(s)")
    return device


def read_json_file(path: str | Path, what: str) -> Any:
    """``json.loads`` of a file, with an error naming the file and the place where a truncated/damaged file breaks."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                         "is it truncated?") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None

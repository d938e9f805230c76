"""Write a directory completely or not at all: build it next to the destination, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False):
    """Yield a temporary sibling of ``destination``; on success it becomes ``destination``, on error it vanishes."""
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite and not _is_empty_dir(destination):
        raise FileExistsError(f"{destination} already exists (pass --overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result may live in a shared cache
    try:
        yield staging
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.rename(destination, retired)
            os.rename(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())

"""Write a directory or a file completely or not at all: build it next to the destination, then rename it into place.

Used wherever the project writes something a crash must not leave half-written: converted checkpoints, the final
trained model, eval reports, the demo model, the training metrics log. Staging folders are named ``.<name>.partial-<pid>-<random>``; one whose process no longer runs was left by a killed
run and is removed the next time the same destination is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``destination``; on success it becomes ``destination``, on error it vanishes."""
    destination = Path(destination).absolute()
    remove_abandoned_staging(destination)  # first: a refused write still clears what a killed one left
    check_replaceable(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-{os.getpid()}-", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result may live in a shared cache
    try:
        yield staging
        move_into_place(staging, destination, retired=destination.with_name(f".{destination.name}.old-{os.getpid()}"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, destination: Path, retired: Path) -> None:
    """Rename the complete ``staging`` folder to ``destination``; an existing destination is first renamed to
    ``retired`` and deleted afterwards, so at every instant one complete copy exists under a known name."""
    if destination.exists():
        os.rename(destination, retired)
        os.rename(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, destination)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary_path)`` next to ``path``, then rename: a crash or a full disk never leaves half a file."""
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_replaceable(destination: str | Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty ``destination`` unless ``overwrite``; call it before long work, too."""
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite and not _is_empty_dir(destination):
        raise FileExistsError(f"{destination} already exists (pass --overwrite to replace it)")


def check_not_overlapping(source: str | Path, destination: str | Path) -> None:
    """Refuse a destination that is the source, lies inside it or contains it: replacing it would delete the source."""
    source, destination = Path(source).resolve(), Path(destination).resolve()
    if source == destination or source in destination.parents or destination in source.parents:
        relation = ("is" if source == destination else
                    "lies inside" if source in destination.parents else "contains")
        raise ValueError(f"destination {destination} {relation} the source {source}; choose a separate directory")


def remove_abandoned_staging(destination: Path) -> None:
    """Delete ``.<name>.partial-<pid>-*`` and ``.<name>.old-<pid>`` siblings whose writing process has died."""
    destination = Path(destination).absolute()
    if not destination.parent.is_dir():
        return
    for leftover in destination.parent.glob(f".{destination.name}.*"):
        kind, _, rest = leftover.name[len(destination.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("partial", "old") and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())

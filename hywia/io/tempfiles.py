"""Every temporary file and folder hywia makes, named after the process that owns it.

A run that ends normally, by an exception, or by SIGINT/SIGTERM under the CLI (which turns them into an exception)
removes its temporaries on the way out. A run killed outright (SIGKILL, the OOM killer, a power cut) cannot, so
every name carries the owner's pid: ``hywia-<kind>-<pid>-<random>`` in the system temporary folder, and
``.<name>.tmp-<pid>-<random>`` beside an output. The next CLI run removes those whose process no longer exists
(`sweep_stale`) and says so in one line. A pid that is alive again (reused) keeps its temporaries: leaving a stale
folder is safer than deleting a live run's.

Folders made for the Python API's caller (disk-offloaded weights, which the returned model keeps reading) are
removed when the interpreter exits.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

PREFIX = "hywia-"
_SYSTEM_TEMP = re.compile(rf"^{PREFIX}[a-z]+(?:-[a-z]+)*-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<state>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")

_created: list[Path] = []


def temp_dir(kind: str) -> Path:
    """A new folder ``hywia-<kind>-<pid>-<random>`` in the system temporary folder; `remove_created` (the CLI's
    end, or interpreter exit) removes it unless `release` did so earlier."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}-"))
    _created.append(folder)
    return folder


def release(folder: Path) -> None:
    """Remove a folder made by `temp_dir` now."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder in _created:
        _created.remove(folder)


@contextmanager
def temp_folder(kind: str) -> Iterator[Path]:
    """`temp_dir` for the length of a block."""
    folder = temp_dir(kind)
    try:
        yield folder
    finally:
        release(folder)


def remove_created() -> None:
    """Remove every folder this process made with `temp_dir`."""
    for folder in list(_created):
        release(folder)


atexit.register(remove_created)


@contextmanager
def removing_created() -> Iterator[None]:
    """Remove, when the block ends, the `temp_dir` folders made inside it (a CLI command's, not those of models
    the calling program made before and still uses)."""
    before = set(_created)
    try:
        yield
    finally:
        for folder in [folder for folder in _created if folder not in before]:
            release(folder)


def sibling_name(path: Path, state: str = "tmp") -> Path:
    """A free name ``.<name>.<state>-<pid>-<random>`` beside `path`, for a file or folder renamed onto it later."""
    path = Path(path)
    return path.with_name(f".{path.name}.{state}-{os.getpid()}-{os.urandom(4).hex()}")


def sibling_dir(path: Path) -> Path:
    """A new folder beside `path` (so that renaming it onto `path` stays on one file system)."""
    path = Path(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True


def stale_temporaries(outputs: Iterable[Path | None] = ()) -> list[Path]:
    """hywia temporaries of ended processes: in the system temporary folder, beside each of `outputs`, and inside
    an output that is a folder (`hywia tune` writes its model folder and report inside OUT). Only this user's.

    A leftover ``.<name>.old-<pid>`` (the output being replaced) counts only when ``<name>`` exists again, so a
    run killed between its two renames keeps the old output."""
    candidates = [(path, _SYSTEM_TEMP.match(path.name)) for path in _entries(Path(tempfile.gettempdir()))]
    for out in outputs:
        if out is None:
            continue
        out = Path(out)
        folders = [out.parent] + ([out] if out.is_dir() and not out.is_symlink() else [])
        for folder in folders:
            for path in _entries(folder):
                match = _SIBLING.match(path.name)
                if match and (folder != out.parent or match["name"] == out.name):
                    if match["state"] == "old" and not path.with_name(match["name"]).exists():
                        continue
                    candidates.append((path, match))
    return [path for path, match in candidates if match and _mine(path) and not pid_alive(int(match["pid"]))]


def sweep_stale(outputs: Iterable[Path | None] = ()) -> tuple[list[Path], int]:
    """Remove `stale_temporaries`; return them and the bytes freed."""
    stale = stale_temporaries(outputs)
    freed = sum(_size(path) for path in stale)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale, freed


def _mine(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.getuid()
    except OSError:  # gone meanwhile
        return False


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:  # missing or unreadable: nothing of ours there
        return []


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total

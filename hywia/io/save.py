"""Atomic saving: everything is written to a temporary sibling folder and renamed into place at the end, so a
failed run never leaves a half-written model behind; and the checks that keep an output from destroying anything."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from ..errors import InvalidRequestError
from . import tempfiles
from .checks import check_finite_weights, strict_json


def check_output(
    out: Path,
    force: bool = False,
    *,
    inputs: Mapping[str, str | Path | None] | None = None,
    file: bool = False,
    existing_ok: bool = False,
) -> None:
    """Fail in one line, before any work, if writing `out` cannot work or would destroy something.

    Refused whatever `force` says: a symbolic link; the current or home folder or one above them; a path that equals,
    contains or lies inside one of `inputs` ({flag: path}, e.g. the model folder, the calibration file), since
    replacing it would delete the input; a folder where a file is wanted and the reverse; a place that cannot be
    written (probed with a folder made and removed at once in the nearest existing parent). An existing `out`
    needs `force`, unless `existing_ok` (a run that continues in `out`, which may then hold its inputs).
    """
    out = Path(out)
    what = "file" if file else "folder"
    if out.is_symlink():
        raise InvalidRequestError(f"{out} is a symbolic link; give the real path or a new {what} name")
    target = out.resolve()
    for protected, name in ((Path.cwd().resolve(), "current"), (Path.home().resolve(), "home")):
        if target == protected or target in protected.parents:
            raise InvalidRequestError(f"{out} is the {name} folder or one above it; name a new {what} for the output")
    for flag, given in (inputs or {}).items():
        if not given:
            continue
        source = Path(given).resolve()
        if target == source:
            raise InvalidRequestError(f"{out} is also {flag}: write the output elsewhere")
        if source in target.parents:
            raise InvalidRequestError(f"{out} lies inside {flag} {given}: write the output elsewhere")
        if target in source.parents and not existing_ok:
            raise InvalidRequestError(f"{out} contains {flag} {given}, which replacing it would delete: "
                                      "write the output elsewhere")
    if out.exists():
        if file and out.is_dir():
            raise InvalidRequestError(f"{out} is a folder; give a file name for the output")
        if not file and not out.is_dir():
            raise InvalidRequestError(f"{out} exists and is not a folder")
        if not force and not existing_ok:
            raise InvalidRequestError(f"{out} already exists; pass --force to overwrite it")
    _check_writable(target.parent)


def _check_writable(folder: Path) -> None:
    """The nearest existing folder at or above `folder` accepts a new entry (made and removed at once)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InvalidRequestError(f"{existing} is a file, so nothing can be written below it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".hywia-probe-{os.getpid()}-", dir=existing))
    except OSError as exc:
        raise InvalidRequestError(f"cannot write in {existing}: {exc.strerror or exc}") from exc


def local_path(name: str | Path | None) -> Path | None:
    """`name` as a path when it names an existing file or folder (not a hub or embedded model name, nor a text
    name such as 'lambada'); None otherwise."""
    if isinstance(name, (str, Path)) and str(name) and Path(name).exists():
        return Path(name)
    return None


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes without error."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfiles.sibling_dir(out)
    try:
        yield tmp
        if out.exists():
            old = tempfiles.sibling_name(out, "old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Replace a file in one step (`write` fills a temporary sibling, renamed onto `path`), so that a reader never
    sees half of it and a failure keeps the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfiles.sibling_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """`write_atomic` of a UTF-8 text."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


SHARD_SIZE = "2GB"


def save_model(model, tokenizer, out: Path, *, extra_json: dict[str, dict] | None = None, force: bool = False) -> Path:
    """Model (safetensors + config with per-layer widths), tokenizer and JSON side files, atomically; a model with
    NaN or Inf weights is refused before anything is written."""
    check_finite_weights(model, f"not saving to {out}")
    with atomic_dir(Path(out), force=force) as tmp:
        # An offloaded model's weights are read back one shard at a time: small shards bound saving's memory.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
        if getattr(model.config, "hywia_layers", None) is not None:  # pruned: its family's modeling code too
            add_remote_code(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(strict_json(payload, indent=2))
    return Path(out)


def add_remote_code(model, folder: Path) -> None:
    """Copy the family's self-contained modeling files (its adapter's `remote_module` and the siblings it imports)
    into a saved pruned folder and point config.json's auto_map at its classes.

    Then transformers alone loads the folder with trust_remote_code=True; where hywia is imported, its registered
    classes still take precedence and no remote code runs.
    """
    from ..models import adapter_for
    from ..models.remote import module_files

    module = adapter_for(model).remote_module
    for path in module_files(module):
        shutil.copyfile(path, folder / path.name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {
        "AutoConfig": f"{module}.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"{module}.{type(model).__name__}",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

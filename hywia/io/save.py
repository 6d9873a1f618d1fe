"""Atomic saving: everything is written to a temporary sibling folder and renamed into place at the end, so a
failed run never leaves a half-written model behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import InvalidRequestError


def check_output(out: Path, force: bool) -> None:
    """Fail before any work if `out` exists and may not be replaced."""
    if out.exists() and not force:
        raise InvalidRequestError(f"{out} already exists; pass --force to overwrite it")


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes without error."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, out: Path, *, extra_json: dict[str, dict] | None = None, force: bool = False) -> Path:
    """Model (safetensors + config with per-layer widths), tokenizer and JSON side files, atomically."""
    with atomic_dir(Path(out), force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(model.config, "hywia_layers", None) is not None:  # pruned: its family's modeling code too
            add_remote_code(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2))
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

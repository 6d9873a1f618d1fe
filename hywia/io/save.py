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
from . import remote_code
from .checks import check_finite_weights, strict_json


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
    """Model (safetensors + config with per-layer widths), tokenizer and JSON side files, atomically; a model with
    NaN or Inf weights is refused before anything is written."""
    check_finite_weights(model, f"not saving to {out}")
    with atomic_dir(Path(out), force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        # the class attribute: a config read from config.json keeps the family's model_type on the instance
        if type(model.config).model_type in remote_code.MODEL_TYPES:  # only pruned classes have these types
            add_remote_code(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(strict_json(payload, indent=2))
    return Path(out)


def add_remote_code(model, folder: Path) -> None:
    """Copy the self-contained modeling files into a saved pruned folder and point config.json's auto_map at them.

    Then transformers alone loads the folder with trust_remote_code=True; where hywia is imported, its registered
    classes still take precedence and no remote code runs.
    """
    for name in remote_code.FILES:
        shutil.copyfile(remote_code.DIR / name, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {
        "AutoConfig": f"configuration_hywia.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"modeling_hywia.{type(model).__name__}",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

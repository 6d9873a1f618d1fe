"""Loading and saving models (safetensors only, atomic writes)."""

from .load import DEFAULT_MODEL, describe, embedded_model_dir, load_model, resolve_dtype
from .save import atomic_dir, check_output, local_path, save_model, write_text_atomic

__all__ = [
    "DEFAULT_MODEL",
    "atomic_dir",
    "check_output",
    "describe",
    "embedded_model_dir",
    "load_model",
    "local_path",
    "resolve_dtype",
    "save_model",
    "write_text_atomic",
]

"""Model families: adapters (where the groups live, LoRA targets, modeling code, GGUF mapping) and pruned classes.

Every module of this package is imported here, so a new family is one new file that registers its adapter
(`@register_adapter`) and its pruned classes (`pruned_classes`); its adapter names the self-contained modeling file
in `remote/` that its pruned folders carry. No other part of hywia lists families: the steps ask the adapter.
"""

import importlib
import pkgutil

from .base import (
    ATTENTION_MODES,
    Adapter,
    GGUFMapping,
    GroupSpec,
    LayerKind,
    TensorSlice,
    adapter_for,
    register_adapter,
    supported_architectures,
)
from .pruned import mark_pruned, pruned_classes

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ATTENTION_MODES",
    "Adapter",
    "GGUFMapping",
    "GroupSpec",
    "LayerKind",
    "TensorSlice",
    "adapter_for",
    "mark_pruned",
    "pruned_classes",
    "register_adapter",
    "supported_architectures",
]

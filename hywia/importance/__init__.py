"""Importance criteria (one registry) and the calibration statistics they read.

Every module of this package is imported here, so a new criterion is one new file with `@register_criterion`.
"""

import importlib
import pkgutil

from .base import Criterion, ScoringContext, available_criteria, get_criterion, register_criterion
from .collect import Statistics, collect_statistics

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Criterion",
    "ScoringContext",
    "Statistics",
    "available_criteria",
    "collect_statistics",
    "get_criterion",
    "register_criterion",
]

"""`hywia bench`: criteria side by side at the same ratios, on the same model, calibration and evaluation data."""

from .run import DEFAULT_CRITERIA, DEFAULT_LIMIT, parse_variant, run

__all__ = ["DEFAULT_CRITERIA", "DEFAULT_LIMIT", "parse_variant", "run"]

"""`hywia bench`: criteria side by side at the same ratios, on the same model, calibration and evaluation data."""

from .run import CROSS_DOMAIN_TEXTS, DEFAULT_CRITERIA, DEFAULT_LIMIT, parse_variant, run

__all__ = ["CROSS_DOMAIN_TEXTS", "DEFAULT_CRITERIA", "DEFAULT_LIMIT", "parse_variant", "run"]

"""From scores to a smaller model: allocation, selection (the plan) and surgery."""

from .apply import apply_plan, mask_plan
from .plan import PruningPlan, allocate_global, allocate_uniform, check_plan_request, parse_layers, select

__all__ = ["PruningPlan", "allocate_global", "allocate_uniform", "apply_plan", "check_plan_request", "mask_plan", "parse_layers", "select"]

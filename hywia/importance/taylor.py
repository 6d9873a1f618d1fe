"""Taylor saliency of each weight (LLM-Pruner's criteria), at both granularities.

s1 = g * W (first order), s2 = g * W - 1/2 * W * F * W with F the Fisher diagonal (second order).
Fine (element) = sum of |s| over the group's weights; coarse (vector) = sum over slices of |sum of s|.
The calibration pass reduces the per-weight saliency to these group terms (`Statistics.taylor`) while each layer's
gradients exist; the criteria only pick one.
"""

from __future__ import annotations

import torch

from .base import Criterion, LayerKind, ScoringContext, register_criterion
from .statistics import TaylorTerms


def taylor_scores(ctx: ScoringContext, mode: str, order: int,
                  terms: dict[LayerKind, TaylorTerms] | None = None) -> dict[LayerKind, torch.Tensor]:
    """One Taylor term per group, from `terms` (default: every window's, `ctx.stats.taylor`; a fold's from
    `ctx.stats.fold_taylor`)."""
    terms = ctx.stats.taylor if terms is None else terms
    return {(layer, spec.kind): terms[(layer, spec.kind)].get(mode, order).clone() for layer, spec in ctx.items()}


class _Taylor(Criterion):
    needs_gradients = True
    mode: str = "fine"
    order: int = 1

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        return taylor_scores(ctx, self.mode, self.order)


@register_criterion("taylor-vector")
class TaylorVector(_Taylor):
    """Coarse-grained: the group as a whole (first-order change of the loss when the slice is removed)."""

    mode, order = "coarse", 1


@register_criterion("taylor-element1")
class TaylorElement1(_Taylor):
    """Fine-grained, first order: every weight's own |g * W|."""

    mode, order = "fine", 1


@register_criterion("taylor-element2")
class TaylorElement2(_Taylor):
    """Fine-grained, second order with the Fisher diagonal."""

    mode, order = "fine", 2

"""Wanda-sp: |W| times the L2 norm of the input channel it reads, summed over the group's weights."""

from __future__ import annotations

import torch

from .base import Criterion, LayerKind, ScoringContext, reduce_groups, register_criterion


@register_criterion("wanda-sp")
class WandaSP(Criterion):
    needs_activations = True

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        def per_weight(layer, s):
            if not s.param.endswith("weight"):
                return None
            name = ctx.full_name(layer, s)
            return ctx.param(layer, s.param).abs() * ctx.stats.act_sq[name].sqrt()[None, :]

        return reduce_groups(ctx, per_weight, "fine")

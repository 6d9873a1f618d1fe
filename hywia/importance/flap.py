"""FLAP's fluctuation metric: how much a group's input channels vary over the calibration tokens, weighted by
the squared norm of the output-projection columns they feed.

A channel whose input barely fluctuates can be replaced by its mean (bias compensation), so its removal costs
little: score_j = Var(x_j) * ||W[:, j]||^2 over the output projection (o_proj for heads, down_proj for MLP).
"""

from __future__ import annotations

import torch

from .base import Criterion, LayerKind, ScoringContext, register_criterion


def fluctuation_scores(ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
    """Per group: the variance over calibration tokens of each input channel of its output projection, times the
    squared norm of the column that channel feeds, summed over the group's channels."""
    scores = {}
    for layer, spec in ctx.items():
        weight = f"{spec.gate_module}.weight"
        name = f"{ctx.adapter.layer_name(layer)}.{weight}"
        mean = ctx.stats.act_sum[name] / ctx.stats.tokens
        variance = (ctx.stats.act_sq[name] / ctx.stats.tokens - mean.square()).clamp_min(0)
        column_energy = ctx.param(layer, weight).square().sum(0)
        per_channel = (variance * column_energy).double().cpu()
        scores[(layer, spec.kind)] = per_channel.view(spec.count, spec.gate_block).sum(1)
    return scores


@register_criterion("flap")
class Flap(Criterion):
    needs_activations = True

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        return fluctuation_scores(ctx)

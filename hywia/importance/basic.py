"""Data-free baselines: random and weight magnitude."""

from __future__ import annotations

import torch

from .base import Criterion, LayerKind, ScoringContext, register_criterion
from .statistics import blocks


@register_criterion("random")
class RandomCriterion(Criterion):
    """Uniform random scores from the run's seed: the floor every real criterion must beat."""

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        generator = torch.Generator().manual_seed(ctx.seed)
        return {(layer, spec.kind): torch.rand(spec.count, generator=generator, dtype=torch.float64)
                for layer, spec in ctx.items()}


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    """L2 norm of all weights a group owns."""

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        scores = {}
        for layer, spec in ctx.items():
            squares = sum(blocks(ctx.param(layer, s.param), s, spec.count).square().sum(1).double() for s in spec.slices)
            scores[(layer, spec.kind)] = squares.sqrt()
        return scores

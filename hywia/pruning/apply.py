"""Surgery: a plan applied physically (smaller tensors) or as a zero-mask on the dense model (for checking)."""

from __future__ import annotations

import torch
from torch import nn

from ..io.mapped import released_when_replaced
from ..models import adapter_for, mark_pruned
from ..offload import editable
from .plan import PruningPlan


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove every group the plan does not keep, in place; the model becomes its pruned class."""
    adapter = adapter_for(model, plan.attention)
    layers = adapter.layers()
    for index, keep in plan.layers.items():
        # An offloaded layer is loaded, cut, and offloaded again at its new size; a memory-mapped one hands back
        # the pages of the tensors it replaced.
        with editable(layers[index]), released_when_replaced(layers[index]):
            adapter.shrink(layers[index], {kind: torch.tensor(kept, dtype=torch.long) for kind, kept in keep.items()})
    mark_pruned(model)
    return model


@torch.no_grad()
def mask_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Zero every slice of every removed group, keeping the dense shapes."""
    adapter = adapter_for(model, plan.attention)
    layers = adapter.layers()
    for index, keep in plan.layers.items():
        layer = layers[index]
        for spec in adapter.group_specs(layer):
            if spec.kind not in keep:
                continue
            removed = torch.ones(spec.count, dtype=torch.bool)
            removed[keep[spec.kind]] = False
            groups = removed.nonzero().squeeze(1)
            for s in spec.slices:
                layer.get_parameter(s.param).index_fill_(s.dim, spec.indices(groups, s), 0.0)
    return model

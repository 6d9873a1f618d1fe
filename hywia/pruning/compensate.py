"""Compensation: let the kept groups and a bias stand in for what the removed groups wrote.

A group's contribution enters the residual stream through its output projection (o_proj for heads, down_proj
for MLP channels: the spec's `gate_module`), as W[:, R] x_R. Over the calibration tokens,
- `bias` (FLAP): add W[:, R] E[x_R] as a bias, so the output keeps its mean;
- `lstsq`: refit the kept columns and a bias by least squares, W[:, R] x_R ~ A x_K + c, from the input's first
  and second moments (ridge-regularised), so the layer's output moves least. `bias` is the special case A = 0.
Both act on the dense weights before surgery, so a plan applied as a mask or physically still agrees.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import Adapter
from ..models.surgery import add_bias
from ..offload import editable
from .plan import PruningPlan

MODES = ("none", "bias", "lstsq")


@torch.no_grad()
def input_moments(
    model: nn.Module, adapter: Adapter, plan: PruningPlan, batches: torch.Tensor, batch_size: int = 8
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int]]:
    """(sum of x, sum of x x^T, tokens) of each pruned output projection's input, in float64 on the CPU."""
    layers = adapter.layers()
    moments: dict[tuple[int, str], list] = {}
    hooks = []
    for index in plan.layers:
        for spec in adapter.group_specs(layers[index]):
            key = (index, spec.kind)
            moments[key] = [0.0, 0.0, 0]

            def hook(module, args, key=key):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
                entry = moments[key]
                entry[0] = entry[0] + x.sum(0)
                entry[1] = entry[1] + x.T @ x
                entry[2] += x.shape[0]

            hooks.append(layers[index].get_submodule(spec.gate_module).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, batches.shape[0], batch_size):
            model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {key: (entry[0], entry[1], entry[2]) for key, entry in moments.items()}


@torch.no_grad()
def compensate(
    adapter: Adapter,
    plan: PruningPlan,
    moments: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int]],
    mode: str,
    ridge: float = 1e-2,
) -> None:
    """Fold the removed groups' expected contribution into the kept columns and/or a bias, in place."""
    layers = adapter.layers()
    for index, keep in plan.layers.items():
        layer = layers[index]
        with editable(layer):  # an offloaded layer is loaded, edited and offloaded again with its new weights
            for spec in adapter.group_specs(layer):
                if spec.kind not in keep or len(keep[spec.kind]) == spec.count:
                    continue
                linear: nn.Linear = layer.get_submodule(spec.gate_module)
                removed = torch.ones(spec.count, dtype=torch.bool)
                removed[keep[spec.kind]] = False
                block = torch.arange(spec.gate_block)
                cols_r = (removed.nonzero() * spec.gate_block + block).reshape(-1)
                cols_k = ((~removed).nonzero() * spec.gate_block + block).reshape(-1)
                total, second, tokens = moments[(index, spec.kind)]
                mean, second = total / tokens, second / tokens
                w_removed = linear.weight[:, cols_r].double().cpu()
                if mode == "bias":
                    delta_w, bias = None, w_removed @ mean[cols_r]
                else:
                    # Normal equations over [x_K; 1]: [A c] Gram = W_R E[x_R [x_K; 1]^T].
                    kept = torch.cat([cols_k, torch.tensor([second.shape[0]])])
                    augmented = torch.zeros(second.shape[0] + 1, second.shape[0] + 1, dtype=torch.float64)
                    augmented[:-1, :-1], augmented[:-1, -1] = second, mean
                    augmented[-1, :-1], augmented[-1, -1] = mean, 1
                    gram = augmented[kept][:, kept]
                    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
                    cross = w_removed @ augmented[cols_r][:, kept]
                    solution = torch.linalg.solve(gram, cross.T).T
                    delta_w, bias = solution[:, :-1], solution[:, -1]
                if delta_w is not None:
                    linear.weight[:, cols_k] += delta_w.to(linear.weight.dtype).to(linear.weight.device)
                add_bias(linear)
                linear.bias += bias.to(linear.bias.dtype).to(linear.bias.device)

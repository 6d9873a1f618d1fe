"""Compensation: let the kept groups and a bias stand in for what the removed groups wrote.

A group's contribution enters the residual stream through its output projection (o_proj for heads, down_proj
for MLP channels: the spec's `gate_module`), as W[:, R] x_R. Layers are visited in order over the calibration
windows, each seeing the inputs of the model as pruned so far (every layer below already pruned and compensated,
the removed groups of its own attention masked when its MLP is fitted), as FLAP computes its statistics:

- `bias` (FLAP): add W[:, R] E[x_R] as a bias, so the output keeps its mean;
- `lstsq`: refit the kept columns and a bias by least squares, W[:, R] x_R ~ A x_K + c (ridge-regularised), so
  the layer's output moves least. `bias` is the special case A = 0.

Only one layer's moments exist at a time. Fitting towards the dense model's outputs instead (so each layer would
also undo the drift of the layers below) was measured and is worse: BENCHMARKS.md. Both modes act on the dense
weights before surgery, so a plan applied as a mask or physically still agrees.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import ActivationStore, capture_layer_inputs
from ..models import Adapter, GroupSpec
from ..models.surgery import add_bias
from ..offload import editable, execution_device, resident
from .plan import PruningPlan

MODES = ("none", "bias", "lstsq")


class ProjectionMoments:
    """Sums over calibration tokens for one output projection, in float64 on the CPU: `removed_sum` of x_R, and
    for `lstsq` also `gram` of z z^T with z = [x_K; 1] and `cross` of (W_R x_R) z^T."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, mode: str) -> None:
        self.weight_removed = weight.detach()[:, removed].double().cpu()
        self.kept, self.removed, self.mode = kept, removed, mode
        size = kept.numel() + 1
        self.gram = torch.zeros(size, size, dtype=torch.float64) if mode == "lstsq" else None
        self.cross = torch.zeros(weight.shape[0], size, dtype=torch.float64) if mode == "lstsq" else None
        self.removed_sum = torch.zeros(removed.numel(), dtype=torch.float64)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).double().cpu()
        self.removed_sum += x[:, self.removed].sum(0)
        self.tokens += x.shape[0]
        if self.mode == "lstsq":
            z = torch.cat([x[:, self.kept], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
            self.gram += z.T @ z
            self.cross += (x[:, self.removed] @ self.weight_removed.T).T @ z

    def solve(self, ridge: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(change of the kept columns or None, bias to add)."""
        if self.mode == "bias":
            return None, self.weight_removed @ (self.removed_sum / self.tokens)
        gram = self.gram / self.tokens
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
        solution = torch.linalg.solve(gram, (self.cross / self.tokens).T).T
        return solution[:, :-1], solution[:, -1]


def _columns(spec: GroupSpec, kept_groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input columns of the output projection that the kept and the removed groups feed."""
    removed = torch.ones(spec.count, dtype=torch.bool)
    removed[kept_groups] = False
    block = torch.arange(spec.gate_block)
    kept_cols = ((~removed).nonzero() * spec.gate_block + block).reshape(-1)
    removed_cols = (removed.nonzero() * spec.gate_block + block).reshape(-1)
    return kept_cols, removed_cols


@contextmanager
def _masked_inputs(layer: nn.Module, specs: list[GroupSpec], masks: dict[str, torch.Tensor],
                   seen: dict[str, torch.Tensor]) -> Iterator[None]:
    """While the block runs, record each output projection's input in `seen` and zero the input columns of its
    removed groups (the same output as the physically pruned layer)."""

    def hook(module, args, name):
        seen[name] = args[0].detach()
        return (args[0] * masks[name].to(args[0].device, args[0].dtype),) + tuple(args[1:])

    handles = [layer.get_submodule(s.gate_module).register_forward_pre_hook(
        lambda module, args, name=s.gate_module: hook(module, args, name)) for s in specs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def compensate(
    model: nn.Module,
    adapter: Adapter,
    plan: PruningPlan,
    batches: torch.Tensor,
    mode: str,
    ridge: float = 1e-2,
    progress: bool = False,
) -> None:
    """Fold the removed groups' contribution into the kept columns and/or a bias of every pruned layer, in place
    (module docstring), layer by layer over the calibration `batches`."""
    if mode == "none" or not plan.layers:
        return
    layers = adapter.layers()
    low, high = min(plan.layers), max(plan.layers)
    acts = ActivationStore(on_disk=False)
    try:
        calls, _ = capture_layer_inputs(model, layers, low, high, batches, acts, input_layers={low})
        hidden = [acts.get(low, sample, torch.device("cpu")) for sample in range(len(batches))]
    finally:
        acts.close()
    for index in tqdm(range(low, high + 1), desc="compensation", disable=not progress, leave=False):
        layer, keep = layers[index], plan.layers.get(index, {})
        specs = [s for s in adapter.group_specs(layer) if s.kind in keep and len(keep[s.kind]) < s.count]
        with editable(layer) if specs else resident(layer):
            _compensate_layer(layer, specs, keep, calls[index], hidden, mode, ridge)


def _compensate_layer(layer: nn.Module, specs: list[GroupSpec], keep: dict[str, list[int]], calls: list,
                      hidden: list[torch.Tensor], mode: str, ridge: float) -> None:
    """One layer: each output projection, in forward order, fitted on the inputs the pruned model gives it; then
    the hidden states are advanced to the pruned layer's output in place."""
    device = execution_device(layer)
    columns = {s.gate_module: _columns(s, keep[s.kind]) for s in specs}
    masks = {}
    for s in specs:
        width = layer.get_submodule(s.gate_module).in_features
        masks[s.gate_module] = torch.zeros(width).index_fill_(0, columns[s.gate_module][0], 1.0)
    for s in specs:
        linear: nn.Linear = layer.get_submodule(s.gate_module)
        moments = ProjectionMoments(linear.weight, *columns[s.gate_module], mode)
        for sample, call in enumerate(calls):
            seen: dict[str, torch.Tensor] = {}
            with _masked_inputs(layer, specs, masks, seen):
                _run_until(layer, call, hidden[sample].to(device), linear)
            moments.add(seen[s.gate_module])
        delta, bias = moments.solve(ridge)
        if delta is not None:
            kept = columns[s.gate_module][0].to(linear.weight.device)
            linear.weight[:, kept] += delta.to(linear.weight.device, linear.weight.dtype)
        add_bias(linear)
        linear.bias += bias.to(linear.bias.device, linear.bias.dtype)
    with _masked_inputs(layer, specs, masks, {}):
        for sample, call in enumerate(calls):
            hidden[sample] = call.run(layer, hidden[sample].to(device)).cpu()


class _Reached(Exception):
    """Ends a layer's forward once the projection being fitted has seen its input."""


def _run_until(layer: nn.Module, call, hidden: torch.Tensor, module: nn.Module) -> None:
    """Run the layer only as far as `module`'s input (what comes after it is not needed for its fit)."""

    def stop(*_):
        raise _Reached

    handle = module.register_forward_hook(stop)
    try:
        call.run(layer, hidden)
    except _Reached:
        pass
    finally:
        handle.remove()

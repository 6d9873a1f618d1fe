"""Compensation: let the kept groups and a bias stand in for what the removed groups wrote.

A group's contribution enters the residual stream through its output projection (o_proj for heads, down_proj
for MLP channels: the spec's `gate_module`), as W[:, R] x_R. Layers are visited in order over the calibration
windows, each seeing the inputs of the model as pruned so far (every layer below already pruned and compensated,
the removed groups of its own attention masked when its MLP is fitted), as FLAP computes its statistics:

- `bias` (FLAP): add W[:, R] E[x_R] as a bias, so the output keeps its mean;
- `lstsq`: refit the kept columns and a bias by least squares, W[:, R] x_R ~ A x_K + c (ridge-regularised), so
  the layer's output moves least. `bias` is the special case A = 0.
- `lstsq-cv`: the same, with each projection's ridge chosen on calibration windows it was not fitted on: the fit
  on the first windows under each of `RIDGES` and bias-only are scored on the last `HELD_OUT_SHARE` of the windows,
  and the winner is refitted on all of them. A projection whose kept columns cannot predict the removed ones
  beyond the training windows falls back to bias-only instead of overfitting them.

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

from ..importance.layerwise import ActivationStore, capture_layer_inputs
from ..importance.statistics import Statistics
from ..models import Adapter, GroupSpec
from ..models.surgery import add_bias
from ..offload import editable, execution_device, resident
from .plan import PruningPlan

MODES = ("none", "bias", "lstsq", "lstsq-cv")
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HELD_OUT_SHARE = 0.25


class ProjectionMoments:
    """Sums over calibration tokens for one output projection, in float64 on the CPU: `removed_sum` of x_R, and
    for least squares also `gram` of z z^T with z = [x_K; 1] and `cross` of (W_R x_R) z^T, kept apart for the
    held-out windows in `lstsq-cv` (`held_gram`, `held_cross`)."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, mode: str) -> None:
        self.weight_removed = weight.detach()[:, removed].double().cpu()
        self.kept, self.removed, self.mode = kept, removed, mode
        size = kept.numel() + 1
        least_squares = mode in ("lstsq", "lstsq-cv")
        self.gram = torch.zeros(size, size, dtype=torch.float64) if least_squares else None
        self.cross = torch.zeros(weight.shape[0], size, dtype=torch.float64) if least_squares else None
        self.held_gram = torch.zeros(size, size, dtype=torch.float64) if mode == "lstsq-cv" else None
        self.held_cross = torch.zeros(weight.shape[0], size, dtype=torch.float64) if mode == "lstsq-cv" else None
        self.removed_sum = torch.zeros(removed.numel(), dtype=torch.float64)
        self.tokens = self.held_tokens = 0
        self.choice: str = mode

    def add(self, inputs: torch.Tensor, held_out: bool = False) -> None:
        """Accumulate one window's inputs; `held_out` ones (lstsq-cv only) only judge the ridge until the refit."""
        x = inputs.reshape(-1, inputs.shape[-1]).double().cpu()
        self.removed_sum += x[:, self.removed].sum(0)
        if self.gram is None:
            self.tokens += x.shape[0]
            return
        z = torch.cat([x[:, self.kept], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        gram, cross = z.T @ z, (x[:, self.removed] @ self.weight_removed.T).T @ z
        if held_out and self.held_gram is not None:
            self.held_gram += gram
            self.held_cross += cross
            self.held_tokens += x.shape[0]
        else:
            self.gram += gram
            self.cross += cross
            self.tokens += x.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(change of the kept columns or None, bias to add); `lstsq-cv` ignores `ridge` and sets `choice`."""
        if self.mode == "bias":
            return None, self.weight_removed @ (self.removed_sum / self.tokens)
        if self.mode == "lstsq-cv" and self.held_tokens:
            ridge = self._choose_ridge()
            self.gram += self.held_gram
            self.cross += self.held_cross
            self.tokens += self.held_tokens
            if ridge is None:
                return None, self.cross[:, -1] / self.tokens
        solution = _ridge_solution(self.gram / self.tokens, self.cross / self.tokens, ridge)
        return solution[:, :-1], solution[:, -1]

    def _choose_ridge(self) -> float | None:
        """The ridge (None: bias-only) whose fit on the first windows has the least error on the held-out ones:
        E||y - S z||^2 = E||y||^2 - 2 tr(S C^T) + tr(S G S^T), the constant E||y||^2 left out."""
        held_gram, held_cross = self.held_gram / self.held_tokens, self.held_cross / self.held_tokens
        gram, cross = self.gram / self.tokens, self.cross / self.tokens
        bias_only = torch.zeros_like(cross)
        bias_only[:, -1] = cross[:, -1]
        candidates = {None: bias_only, **{r: _ridge_solution(gram, cross, r) for r in RIDGES}}
        errors = {r: float(((s @ held_gram) * s).sum() - 2 * (s * held_cross).sum()) for r, s in candidates.items()}
        best = min(errors, key=errors.get)
        self.choice = "bias" if best is None else f"ridge {best:g}"
        return best


def _ridge_solution(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """S minimising E||y - S z||^2 + ridge * mean(diag G) * ||S||^2 from G = E[z z^T] and C = E[y z^T]."""
    regularised = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(regularised, cross.T).T


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
) -> dict[str, str]:
    """Fold the removed groups' contribution into the kept columns and/or a bias of every pruned layer, in place
    (module docstring), layer by layer over the calibration `batches`. Returns each compensated projection's fit
    (`bias`, `lstsq`, or under `lstsq-cv` the chosen `ridge R` / `bias`), by module name."""
    if mode == "none" or not plan.layers:
        return {}
    layers = adapter.layers()
    low, high = min(plan.layers), max(plan.layers)
    acts = ActivationStore(on_disk=False)
    try:
        calls, _ = capture_layer_inputs(model, layers, low, high, batches, acts, Statistics(), [],
                                        input_layers={low})
        hidden = [acts.get(low, sample, torch.device("cpu")) for sample in range(len(batches))]
    finally:
        acts.close()
    fits = {}
    for index in tqdm(range(low, high + 1), desc="compensation", disable=not progress, leave=False):
        layer, keep = layers[index], plan.layers.get(index, {})
        specs = [s for s in adapter.group_specs(layer) if s.kind in keep and len(keep[s.kind]) < s.count]
        with editable(layer) if specs else resident(layer):
            layer_fits = _compensate_layer(layer, specs, keep, calls[index], hidden, mode, ridge)
        fits.update({f"{adapter.layer_name(index)}.{name}": fit for name, fit in layer_fits.items()})
    return fits


def _compensate_layer(layer: nn.Module, specs: list[GroupSpec], keep: dict[str, list[int]], calls: list,
                      hidden: list[torch.Tensor], mode: str, ridge: float) -> dict[str, str]:
    """One layer: each output projection, in forward order, fitted on the inputs the pruned model gives it; then
    the hidden states are advanced to the pruned layer's output in place. Returns each projection's fit."""
    device = execution_device(layer)
    columns = {s.gate_module: _columns(s, keep[s.kind]) for s in specs}
    masks = {}
    for s in specs:
        width = layer.get_submodule(s.gate_module).in_features
        masks[s.gate_module] = torch.zeros(width).index_fill_(0, columns[s.gate_module][0], 1.0)
    fits = {}
    first_held_out = len(calls) - int(len(calls) * HELD_OUT_SHARE)
    for s in specs:
        linear: nn.Linear = layer.get_submodule(s.gate_module)
        moments = ProjectionMoments(linear.weight, *columns[s.gate_module], mode)
        for sample, call in enumerate(calls):
            seen: dict[str, torch.Tensor] = {}
            with _masked_inputs(layer, specs, masks, seen):
                _run_until(layer, call, hidden[sample].to(device), linear)
            moments.add(seen[s.gate_module], held_out=sample >= first_held_out)
        delta, bias = moments.solve(ridge)
        fits[s.gate_module] = moments.choice
        if delta is not None:
            kept = columns[s.gate_module][0].to(linear.weight.device)
            linear.weight[:, kept] += delta.to(linear.weight.device, linear.weight.dtype)
        add_bias(linear)
        linear.bias += bias.to(linear.bias.device, linear.bias.dtype)
    with _masked_inputs(layer, specs, masks, {}):
        for sample, call in enumerate(calls):
            hidden[sample] = call.run(layer, hidden[sample].to(device)).cpu()
    return fits


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

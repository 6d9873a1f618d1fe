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

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import replay_start
from ..models import Adapter, GroupSpec
from ..models.surgery import add_bias
from ..offload import editable, execution_device, resident
from .plan import PruningPlan

MODES = ("none", "bias", "lstsq")


class _Sums:
    """Token sums of one split of the calibration windows (module docstring of ProjectionMoments)."""

    def __init__(self, rows: int, kept: int, removed: int, lstsq: bool) -> None:
        self.gram = torch.zeros(kept + 1, kept + 1, dtype=torch.float64) if lstsq else None
        self.cross = torch.zeros(rows, kept + 1, dtype=torch.float64) if lstsq else None
        self.removed_sum = torch.zeros(removed, dtype=torch.float64)
        self.tokens = 0


class ProjectionMoments:
    """Sums over calibration tokens for one output projection, in float64 on the CPU: of x_R, and for `lstsq` also
    of z z^T with z = [x_K; 1] (`gram`) and of (W_R x_R) z^T (`cross`). Windows marked held out are summed apart:
    the ridge is then chosen on them (`solve`)."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, mode: str,
                 validated: bool = False) -> None:
        self.weight_removed = weight.detach()[:, removed].double().cpu()
        self.kept, self.removed, self.mode = kept, removed, mode
        shape = (weight.shape[0], kept.numel(), removed.numel(), mode == "lstsq")
        self.fit = _Sums(*shape)
        self.held_out = _Sums(*shape) if validated else None

    def add(self, inputs: torch.Tensor, held_out: bool = False) -> None:
        sums = self.held_out if held_out else self.fit
        x = inputs.reshape(-1, inputs.shape[-1]).double().cpu()
        sums.removed_sum += x[:, self.removed].sum(0)
        sums.tokens += x.shape[0]
        if self.mode == "lstsq":
            z = torch.cat([x[:, self.kept], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
            # accumulated in place: a product the size of the Gram matrix never exists beside it
            sums.gram.addmm_(z.T, z)
            sums.cross.addmm_((x[:, self.removed] @ self.weight_removed.T).T, z)

    def solve(self, ridge: float, decades: int = 2) -> tuple[torch.Tensor | None, torch.Tensor, str]:
        """(change of the kept columns or None, bias to add, what was chosen). Without held-out windows: the
        `lstsq` fit at `ridge`. With them, `ridge` x 10^k (k = -decades..decades) and the bias alone (A = 0) are
        each fitted on the other windows and scored by the error they leave on the held-out ones; the winner is
        refitted on all."""
        best = f"ridge {ridge:g}" if self.mode == "lstsq" else "bias"
        if self.held_out is not None and self.mode == "lstsq":
            best = self._choose(ridge, decades)
        self._merge_held_out()
        if best == "bias":
            return None, self._bias(self.fit), best
        return *self._split(self._lstsq(self.fit, float(best.split()[1]))), best

    def _choose(self, ridge: float, decades: int) -> str:
        """The fit (ridge x 10^k, or the bias alone) that leaves the least error on the held-out windows. One
        candidate exists at a time: the moments of a wide MLP projection are tens of MB each."""
        gram, cross = self.held_out.gram, self.held_out.cross  # token sums: the 1/tokens scale moves no argmin
        errors = {}
        for name in [f"ridge {ridge * 10.0 ** k:g}" for k in range(-decades, decades + 1)] + ["bias"]:
            if name == "bias":
                solution = torch.zeros_like(cross)
                solution[:, -1] = self._bias(self.fit)
            else:
                solution = self._lstsq(self.fit, float(name.split()[1]))
            # sum over held-out tokens of ||W_R x_R - S z||^2, but for the constant sum of ||W_R x_R||^2
            errors[name] = float(((solution @ gram) * solution).sum() - 2 * (solution * cross).sum())
            del solution
        return min(errors, key=errors.get)

    def _merge_held_out(self) -> None:
        """Add the held-out windows' sums into the fitted ones, in place: the chosen fit uses every window."""
        if self.held_out is None:
            return
        for name in ("gram", "cross", "removed_sum"):
            part = getattr(self.held_out, name)
            if part is not None:
                getattr(self.fit, name).add_(part)
        self.fit.tokens += self.held_out.tokens
        self.held_out = None

    def _bias(self, sums: _Sums) -> torch.Tensor:
        return self.weight_removed @ (sums.removed_sum / sums.tokens)

    @staticmethod
    def _lstsq(sums: _Sums, ridge: float) -> torch.Tensor:
        """S with S (G + ridge * mean(diag G) I) = C. The ridge is relative to the mean diagonal, so the token count
        cancels and the sums are solved as they are; the ridge goes onto the diagonal in place and the diagonal is
        restored exactly afterwards: no copy of a Gram matrix that is tens of MB for a wide MLP projection."""
        diagonal = sums.gram.diagonal()
        saved = diagonal.clone()
        diagonal.add_(ridge * saved.mean())
        try:
            return torch.linalg.solve(sums.gram, sums.cross, left=False)
        finally:
            diagonal.copy_(saved)

    @staticmethod
    def _split(solution: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return solution[:, :-1], solution[:, -1]


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
    holdout: float = 0.0,
    decades: int = 2,
    progress: bool = False,
) -> dict[str, int]:
    """Fold the removed groups' contribution into the kept columns and/or a bias of every pruned layer, in place
    (module docstring), layer by layer over the calibration `batches`. With `holdout` > 0 that share of the
    windows (the last ones; at least one, and at least one left to fit on) chooses each projection's ridge within
    `decades` powers of ten of `ridge`, or the bias alone (`ProjectionMoments.solve`). Returns how often each fit
    was chosen."""
    chosen: dict[str, int] = {}
    if mode == "none" or not plan.layers:
        return chosen
    held_out = min(max(math.ceil(holdout * len(batches)), 1), len(batches) - 1) if holdout > 0 else 0
    layers = adapter.layers()
    low, high = min(plan.layers), max(plan.layers)
    calls, hidden, _ = replay_start(model, layers, low, high, batches)
    for index in tqdm(range(low, high + 1), desc="compensation", disable=not progress, leave=False):
        layer, keep = layers[index], plan.layers.get(index, {})
        specs = [s for s in adapter.group_specs(layer) if s.kind in keep and len(keep[s.kind]) < s.count]
        with editable(layer) if specs else resident(layer):
            for choice in _compensate_layer(layer, specs, keep, calls[index], hidden, mode, ridge, held_out,
                                            decades):
                chosen[choice] = chosen.get(choice, 0) + 1
    return chosen


def _compensate_layer(layer: nn.Module, specs: list[GroupSpec], keep: dict[str, list[int]], calls: list,
                      hidden: list[torch.Tensor], mode: str, ridge: float, held_out: int,
                      decades: int) -> list[str]:
    """One layer: each output projection, in forward order, fitted on the inputs the pruned model gives it; then
    the hidden states are advanced to the pruned layer's output in place. The last `held_out` windows choose the
    ridge; returns each projection's choice."""
    device = execution_device(layer)
    choices = []
    columns = {s.gate_module: s.gate_columns(keep[s.kind]) for s in specs}
    masks = {}
    for s in specs:
        width = layer.get_submodule(s.gate_module).in_features
        masks[s.gate_module] = torch.zeros(width).index_fill_(0, columns[s.gate_module][0], 1.0)
    for s in specs:
        linear: nn.Linear = layer.get_submodule(s.gate_module)
        moments = ProjectionMoments(linear.weight, *columns[s.gate_module], mode, validated=held_out > 0)
        for sample, call in enumerate(calls):
            seen: dict[str, torch.Tensor] = {}
            with _masked_inputs(layer, specs, masks, seen):
                _run_until(layer, call, hidden[sample].to(device), linear)
            moments.add(seen[s.gate_module], held_out=sample >= len(calls) - held_out)
        delta, bias, choice = moments.solve(ridge, decades)
        choices.append(choice)
        if delta is not None:
            kept = columns[s.gate_module][0].to(linear.weight.device)
            linear.weight[:, kept] += delta.to(linear.weight.device, linear.weight.dtype)
        add_bias(linear)
        linear.bias += bias.to(linear.bias.device, linear.bias.dtype)
    with _masked_inputs(layer, specs, masks, {}):
        for sample, call in enumerate(calls):
            hidden[sample] = call.run(layer, hidden[sample].to(device)).cpu()
    return choices


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

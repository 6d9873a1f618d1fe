"""The LM loss a cut leaves on held-out windows when least squares stands in for the removed groups.

`--compensate lstsq` refits each output projection's kept columns and a bias so that W[:, R] x_R ~ A x_K + c. That
is the same as replacing the removed inputs by their least-squares prediction from the kept ones,
x_R <- B [x_K; 1] with B = G[R, K'] (G[K', K'] + ridge)^-1 (G the Gram matrix of [x; 1], K' the kept columns and
the constant), and keeping W as it is. A fusion that chooses between candidate scores by their held-out loss
(`hywia:validate`) must judge each cut with that replacement: replacing a removed group by its mean instead is bias
compensation, which favours the views made for it and hides what the refit recovers.

The layers are replayed in order. Each layer's Gram matrices come from the dense model's inputs on the fitting
windows (the approximation the OBS view makes too; the compensation fits on the inputs of the model as pruned so
far), and every candidate's held-out windows advance through the layer with its own removed inputs replaced. One
layer's Gram matrices and one candidate's predictors exist at a time.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import replay_start
from ..models import GroupSpec
from ..offload import execution_device, resident
from .base import LayerKind, ScoringContext
from .obs import gram_sums, output_grams
from .statistics import lm_loss


def input_columns(spec: GroupSpec, groups: list[int]) -> torch.Tensor:
    """The output projection's input columns that these groups feed."""
    first = torch.tensor(groups, dtype=torch.long)[:, None] * spec.gate_block
    return (first + torch.arange(spec.gate_block)).reshape(-1)


def predictor(gram: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, ridge: float) -> torch.Tensor:
    """B^T [|K| + 1, |R|]: the ridge least-squares prediction of the removed inputs from the kept ones and a
    constant (module docstring), the ridge in units of the mean diagonal as the compensation adds it."""
    constant = torch.tensor([gram.shape[0] - 1])
    rows = torch.cat([kept, constant])
    system = gram[rows[:, None], rows]
    system.diagonal().add_(ridge * float(system.diagonal().mean()))
    return torch.linalg.solve(system, gram[rows[:, None], removed])


@dataclass(frozen=True)
class CorePrediction:
    """The least-squares prediction of a projection's other inputs from its core inputs and a constant."""

    core: torch.Tensor  # input columns of the core groups
    others: torch.Tensor  # input columns of the other groups
    weights: torch.Tensor  # B^T, [|core| + 1, |others|], float32

    def fill(self, x: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """`replacement` (shaped as `x`) with its other columns set to their prediction from `x`'s core columns."""
        z = torch.cat([x[..., self.core], x.new_ones(*x.shape[:-1], 1)], -1)
        replacement[..., self.others] = z @ self.weights.to(x.device, x.dtype)
        return replacement


def core_predictions(ctx: ScoringContext, cores: dict[LayerKind, list[int]], batches: torch.Tensor,
                     ridge: float) -> dict[LayerKind, CorePrediction]:
    """For each (layer, kind) in `cores`, the prediction of its other groups' inputs from its core groups' inputs,
    fitted on the dense model's inputs over `batches`: what the least-squares compensation will let a removed
    group become while the core stays. One layer's Gram matrices exist at a time."""
    specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
    predictions = {}
    for key, gram in output_grams(dataclasses.replace(ctx, batches=batches)):
        spec = specs[key]
        others = sorted(set(range(spec.count)) - set(cores.get(key, range(spec.count))))
        if others:
            core, rest = input_columns(spec, cores[key]), input_columns(spec, others)
            predictions[key] = CorePrediction(core, rest, predictor(gram, core, rest, ridge).float())
    return predictions


@contextmanager
def _predicted_inputs(layer: nn.Module, predictors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                      ) -> Iterator[None]:
    """While the block runs, each projection named in `predictors` (kept columns, removed columns, B^T) sees its
    removed inputs replaced by their prediction from the kept ones."""

    def hook(module, args, name):
        kept, removed, weights = predictors[name]
        x = args[0]
        z = torch.cat([x[..., kept].double(), x.new_ones(*x.shape[:-1], 1, dtype=torch.float64)], -1)
        replaced = x.clone()
        replaced[..., removed] = (z @ weights.to(x.device)).to(x.dtype)
        return (replaced,) + tuple(args[1:])

    handles = [layer.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name in predictors]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _loss_above(model: nn.Module, layer: nn.Module, ids: torch.Tensor, hidden: torch.Tensor) -> float:
    """The LM loss of window `ids` when `layer` outputs `hidden`: the layers above it and the head run as usual."""

    def replace(module, args, output):
        if isinstance(output, tuple):
            return (hidden.to(output[0].device, output[0].dtype),) + tuple(output[1:])
        return hidden.to(output.device, output.dtype)

    handle = layer.register_forward_hook(replace)
    try:
        return float(lm_loss(model, ids[None].to(execution_device(model))))
    finally:
        handle.remove()


@torch.no_grad()
def refit_held_out_losses(ctx: ScoringContext, kept: dict[str, dict[LayerKind, list[int]]], fit: torch.Tensor,
                          held_out: torch.Tensor, ridge: float) -> dict[str, float]:
    """Mean LM loss on the `held_out` windows of each candidate cut (`kept`: name -> the groups its plan keeps),
    its removed inputs predicted by least squares fitted on the `fit` windows (module docstring)."""
    layers = ctx.adapter.layers()
    low, high = min(ctx.layer_indices), max(ctx.layer_indices)
    fit_calls, fit_hidden = replay_start(ctx.model, layers, low, high, fit)
    held_calls, held_hidden = replay_start(ctx.model, layers, low, high, held_out)
    hidden = {name: list(held_hidden) for name in kept}
    for index in tqdm(range(low, high + 1), desc="validation", disable=not ctx.progress, leave=False):
        layer = layers[index]
        specs = ctx.specs.get(index, []) if index in ctx.layer_indices else []
        grams: dict[str, torch.Tensor] = {}
        with resident(layer):
            device = execution_device(layer)
            with gram_sums(layer, specs, grams):
                for sample, call in enumerate(fit_calls[index]):
                    fit_hidden[sample] = call.run(layer, fit_hidden[sample].to(device)).cpu()
            for name, groups in kept.items():
                predictors = {}
                for spec in specs:
                    kept_groups = groups.get((index, spec.kind), list(range(spec.count)))
                    if len(kept_groups) == spec.count:
                        continue
                    removed_groups = sorted(set(range(spec.count)) - set(kept_groups))
                    columns = input_columns(spec, kept_groups), input_columns(spec, removed_groups)
                    predictors[spec.gate_module] = (*columns, predictor(grams[spec.gate_module], *columns, ridge))
                with _predicted_inputs(layer, predictors):
                    for sample, call in enumerate(held_calls[index]):
                        hidden[name][sample] = call.run(layer, hidden[name][sample].to(device)).cpu()
        grams.clear()
    return {name: sum(_loss_above(ctx.model, layers[high], held_out[sample], state[sample])
                      for sample in range(held_out.shape[0])) / held_out.shape[0]
            for name, state in hidden.items()}

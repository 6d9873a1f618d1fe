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
layer's Gram matrices and one candidate's predictors exist at a time. The losses then come from the layers above the
last pruned one and the head alone (`standing_aside`): the layers below have been replayed already.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import replay_start
from ..calibration.capture import standing_aside
from ..calibration.prediction import InputPrediction, input_prediction
from ..offload import execution_device, resident
from .base import LayerKind, ScoringContext
from .obs import gram_sums, output_grams
from .statistics import lm_loss


def core_predictions(ctx: ScoringContext, cores: dict[LayerKind, list[int]], batches: torch.Tensor,
                     ridge: float) -> dict[LayerKind, InputPrediction]:
    """For each (layer, kind) in `cores`, the prediction (float32) of its other groups' inputs from its core groups'
    inputs, fitted on the dense model's inputs over `batches`: what the least-squares compensation will let a
    removed group become while the core stays. One layer's Gram matrices exist at a time."""
    specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
    predictions = {}
    for key, gram in output_grams(dataclasses.replace(ctx, batches=batches)):
        prediction = input_prediction(gram, specs[key], cores[key], ridge, torch.float32) if key in cores else None
        if prediction is not None:
            predictions[key] = prediction
    return predictions


@contextmanager
def _predicted_inputs(layer: nn.Module, predictions: dict[str, InputPrediction]) -> Iterator[None]:
    """While the block runs, each projection named in `predictions` sees its removed inputs replaced by their
    prediction from the kept ones."""
    with ExitStack() as hooks:  # a hook's handle removes it on exit
        for name, prediction in predictions.items():
            hooks.enter_context(layer.get_submodule(name).register_forward_pre_hook(prediction.pre_hook))
        yield


def _losses_above(model: nn.Module, layers: list[nn.Module], high: int, arity: int, held_out: torch.Tensor,
                  hidden: list[torch.Tensor]) -> torch.Tensor:
    """The LM loss of each window of `held_out` when layer `high` outputs its `hidden`: the layers up to `high`
    stand aside in the model's own forward (the last hands `hidden` over), so only the layers above and the head
    run, as the full forward would run them on that output."""
    current: dict[str, torch.Tensor] = {}
    device, handover_device = execution_device(model), execution_device(layers[high])
    losses = []
    with standing_aside(layers, high, lambda: current["hidden"], arity):
        for ids, state in zip(held_out, hidden, strict=True):
            current["hidden"] = state.to(handover_device)
            losses.append(float(lm_loss(model, ids[None].to(device))))
    return torch.tensor(losses, dtype=torch.float64)


@torch.no_grad()
def refit_held_out_losses(ctx: ScoringContext, kept: dict[str, dict[LayerKind, list[int]]], fit: torch.Tensor,
                          held_out: torch.Tensor, ridge: float) -> dict[str, torch.Tensor]:
    """The LM loss on each of the `held_out` windows of each candidate cut (`kept`: name -> the groups its plan
    keeps), its removed inputs predicted by least squares fitted on the `fit` windows (module docstring)."""
    layers = ctx.adapter.layers()
    low, high = min(ctx.layer_indices), max(ctx.layer_indices)
    fit_calls, fit_hidden, _ = replay_start(ctx.model, layers, low, high, fit)
    held_calls, held_hidden, arity = replay_start(ctx.model, layers, low, high, held_out)
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
                predictions = {}
                for spec in specs:
                    prediction = input_prediction(grams[spec.gate_module], spec,
                                                  groups.get((index, spec.kind), list(range(spec.count))), ridge)
                    if prediction is not None:
                        predictions[spec.gate_module] = prediction
                with _predicted_inputs(layer, predictions):
                    for sample, call in enumerate(held_calls[index]):
                        hidden[name][sample] = call.run(layer, hidden[name][sample].to(device)).cpu()
    return {name: _losses_above(ctx.model, layers, high, arity, held_out, state) for name, state in hidden.items()}

"""One calibration pass: group-level Taylor terms of the pruned layers and per-channel input activation sums.

Criteria read these and never run the model themselves (the learned fusion aside). Gradients are taken one sample
at a time so the Fisher diagonal is the mean of per-sample squared gradients, not the square of a mean. Two paths
give the same statistics:

- `layerwise` (default): the layer-by-layer pass of `hywia.importance.layerwise`; only one layer's gradients and
  accumulators exist at a time.
- `plain`: one full backward per sample, accumulating every pruned weight's gradient and squared gradient at once
  (about twice the pruned layers' weights in extra memory); kept as the reference the other path is tested
  against, and it also keeps the per-weight `grad`/`fisher`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import STORES
from ..errors import InvalidRequestError
from ..models import Adapter
from ..offload import execution_device, is_offloaded
from .statistics import (Statistics, accumulate, activation_hooks, check_finite, check_folds, fold_of, fold_sizes,
                         lm_loss, non_finite_loss_error, taylor_terms)
from .layerwise import layerwise_gradients

PATHS = ("layerwise", "plain")

__all__ = ["PATHS", "Statistics", "collect_statistics", "lm_loss"]


def collect_statistics(
    model: nn.Module,
    adapter: Adapter,
    layer_indices: list[int],
    batches: torch.Tensor,
    *,
    gradients: bool = True,
    activations: bool = True,
    progress: bool = True,
    path: str = "layerwise",
    store: str = "auto",
    folds: int = 1,
) -> Statistics:
    """Run the calibration windows through the model, one sample per step.

    With `folds` > 1 the group terms are also kept per fold of the windows (`Statistics.fold_taylor`), at the cost of
    one more gradient sum and square per fold (per pruned layer on the layerwise path, per pruned weight on the plain).

    `store` (layerwise path only) says where the per-sample layer inputs and upstream gradients wait: `memory`
    (host memory), `disk` (a temporary folder) or `auto` (disk when the model computes on the CPU, whose memory is
    the one being saved; host memory next to an accelerator).
    """
    if path not in PATHS:
        raise InvalidRequestError(f"importance path must be one of {', '.join(PATHS)}, got {path!r}")
    if store not in STORES:
        raise InvalidRequestError(f"activation store must be one of {', '.join(STORES)}, got {store!r}")
    check_folds(folds, len(batches))
    if gradients and path == "plain" and is_offloaded(model):
        raise InvalidRequestError("an offloaded model needs the layerwise importance path")
    prefixes = [adapter.layer_name(i) + "." for i in layer_indices]
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        if not gradients:
            stats = _forward_only(model, batches, prefixes, activations, progress)
            if not math.isfinite(stats.loss):
                raise non_finite_loss_error(model, adapter, batches)
            return stats
        if path == "plain":
            return _plain(model, adapter, layer_indices, batches, prefixes, activations, progress, folds)
        return layerwise_gradients(model, adapter, layer_indices, batches, activations=activations,
                                   progress=progress, store=store, folds=folds)
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        model.train(was_training)


def _forward_only(model: nn.Module, batches: torch.Tensor, prefixes: list[str], activations: bool,
                  progress: bool) -> Statistics:
    """Activation sums and the loss, without gradients (the same for both paths: nothing per weight is kept)."""
    stats = Statistics()
    device = execution_device(model)
    total_loss = 0.0
    with activation_hooks(model, stats, prefixes if activations else []), torch.no_grad():
        for sample in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            input_ids = sample[None].to(device)
            total_loss += lm_loss(model, input_ids).item()
            stats.tokens += input_ids.numel()
            stats.samples += 1
    stats.loss = total_loss / max(stats.samples, 1)
    return stats


def _plain(model: nn.Module, adapter: Adapter, layer_indices: list[int], batches: torch.Tensor,
           prefixes: list[str], activations: bool, progress: bool, folds: int = 1) -> Statistics:
    """Full backward per sample; every pruned weight's gradient statistics are accumulated at once (and each
    fold's apart, when `folds` > 1)."""
    stats = Statistics()
    fold_moments = [({}, {}) for _ in range(folds if folds > 1 else 0)]
    device = execution_device(model)
    tracked = {n: p for n, p in model.named_parameters() if any(n.startswith(pre) for pre in prefixes)}
    for param in tracked.values():
        param.requires_grad_(True)
    total_loss = 0.0
    with activation_hooks(model, stats, prefixes if activations else []):
        for index, sample in enumerate(tqdm(batches, desc="calibration", disable=not progress, leave=False)):
            input_ids = sample[None].to(device)
            loss = lm_loss(model, input_ids)
            if not torch.isfinite(loss):
                raise non_finite_loss_error(model, adapter, batches)
            loss.backward()
            tables = [(stats.grad, stats.fisher)] + ([fold_moments[fold_of(index, folds)]] if fold_moments else [])
            for name, param in tracked.items():
                grad = param.grad.detach().float()
                param.grad = None
                check_finite(name, grad, param.dtype)
                for grads, fishers in tables:
                    accumulate(grads, name, grad)
                    accumulate(fishers, name, grad.square())
            total_loss += loss.item()
            stats.tokens += input_ids.numel()
            stats.samples += 1
    stats.loss = total_loss / max(stats.samples, 1)
    stats.taylor = _group_terms(adapter, layer_indices, stats.grad, stats.fisher, stats.samples)
    stats.fold_taylor = [_group_terms(adapter, layer_indices, *moments, count)
                         for moments, count in zip(fold_moments, fold_sizes(stats.samples, folds))]
    return stats


def _group_terms(adapter: Adapter, layer_indices: list[int], grads: dict[str, torch.Tensor],
                 fishers: dict[str, torch.Tensor], samples: int) -> dict:
    """The group terms of every pruned layer from per-weight gradient and squared-gradient sums over `samples`
    windows (turned into means in place)."""
    for table in (grads, fishers):
        for name in table:
            table[name] /= samples
    layers = adapter.layers()
    terms = {}
    for index in layer_indices:
        prefix = adapter.layer_name(index)
        for spec in adapter.group_specs(layers[index]):
            terms[(index, spec.kind)] = taylor_terms(spec, (
                (s, layers[index].get_parameter(s.param).detach().float(),
                 grads[f"{prefix}.{s.param}"], fishers[f"{prefix}.{s.param}"])
                for s in spec.slices
            ))
    return terms

"""OBS: the layer's output error a group's removal leaves once the kept weights are refitted, removed greedily.

The structured Optimal Brain Surgeon of SlimGPT (Ling et al., NeurIPS 2024) and ZipLM (Kurtic et al., NeurIPS
2023). A group writes into the residual stream through the input columns C of its output projection (o_proj for a
head, down_proj for an MLP channel). With H the Gram matrix of that projection's inputs over the calibration tokens
(a constant input appended, so a bias is refitted too; damped by `damp` x its mean diagonal), removing C and
refitting every kept column optimally raises the output's squared error by

    tr(W[:, C] (H^-1[C, C])^-1 W[:, C]^T),

and the refit is W <- W - W[:, C] (H^-1[C, C])^-1 H^-1[C, :], with H^-1 updated the same way. Groups are removed
greedily, the cheapest first, a batch at a time (`steps` batches per layer and kind: SlimGPT's batched greedy
pruning), each batch's errors computed after the previous batches' refits; a head's error takes its whole block of
H^-1, which is what SlimGPT's grouped Cholesky computes. A group's score is the largest error met up to its removal
(so the removal order is the score order), per calibration token: the squared error in the residual stream, on one
scale for every layer, which a global allocation can rank.

What differs from SlimGPT: H is taken from the dense model's inputs in one pass (SlimGPT prunes layer by layer on
the inputs of the layers already pruned), and the refit itself is left to the compensation (`--compensate lstsq`,
which fits the kept columns and a bias on those sequential inputs: SlimGPT's update). Its per-layer ratio that grows
with depth is the `log` allocation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import replay_start
from ..models import GroupSpec
from ..offload import execution_device, resident
from .base import Criterion, LayerKind, ScoringContext, register_criterion


@dataclass(frozen=True)
class ObsSettings:
    """`steps`: greedy batches per layer and kind (more = closer to one group at a time, slower); `damp`: added to
    the Gram matrix's diagonal, in units of its mean diagonal."""

    steps: int = 64
    damp: float = 1e-2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.damp <= 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")


def greedy_obs_errors(weight: torch.Tensor, gram: torch.Tensor, block: int, steps: int,
                      damp: float) -> torch.Tensor:
    """Each group's error when greedily removed (module docstring), in removal order made monotone.

    `weight` [rows, groups * block] is the output projection; `gram` [groups * block + 1] squared, the inputs'
    Gram matrix with a constant input last (never removed). Returns float64 [groups]: higher = removed later.
    """
    columns = weight.shape[1]
    count = columns // block
    w = torch.cat([weight.double(), torch.zeros(weight.shape[0], 1, dtype=torch.float64)], 1)
    h = gram.double().clone()
    h.diagonal().add_(damp * float(h.diagonal()[:columns].mean().clamp_min(1e-30)))
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    alive = torch.arange(count)  # group ids in the order of the columns still in w and h_inv (constant last)
    errors = torch.zeros(count, dtype=torch.float64)
    per_step = max(1, math.ceil(count / steps))
    order: list[int] = []
    within = torch.arange(block)
    while alive.numel():
        n = alive.numel()
        blocks = h_inv[:-1, :-1].reshape(n, block, n, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        w_groups = w[:, :-1].reshape(w.shape[0], n, block).permute(1, 2, 0)  # [groups, block, rows]
        step_errors = (w_groups * torch.linalg.solve(blocks, w_groups)).sum((1, 2))
        chosen = step_errors.argsort()[:per_step]
        errors[alive[chosen]] = step_errors[chosen]
        order.extend(alive[chosen].tolist())
        removed = (chosen[:, None] * block + within).reshape(-1)
        pivot = torch.linalg.solve(h_inv[removed][:, removed], h_inv[removed])  # (H^-1_CC)^-1 H^-1_C:
        w -= w[:, removed] @ pivot
        h_inv -= h_inv[:, removed] @ pivot
        kept_groups = torch.ones(n, dtype=torch.bool).index_fill_(0, chosen, False)
        kept = torch.cat([(kept_groups.nonzero().squeeze(1)[:, None] * block + within).reshape(-1),
                          torch.tensor([n * block])])
        w, h_inv, alive = w[:, kept], h_inv[kept[:, None], kept], alive[kept_groups]
    scores = torch.empty(count, dtype=torch.float64)
    ordered = errors[order].cummax(0).values
    # Equal running maxima keep the removal order: a tie-break far below any error's own precision.
    ramp = 1 + 1e-9 * torch.arange(count, dtype=torch.float64) / count
    scores[order] = ordered * ramp
    return scores


def output_grams(ctx: ScoringContext) -> Iterator[tuple[LayerKind, torch.Tensor]]:
    """The Gram matrix ([x; 1] [x; 1]^T, per calibration token, float64) of every pruned output projection's
    inputs, layer by layer over the dense model, each yielded once its layer has run: one layer's Gram matrices
    exist at a time (all of SmolLM2's at once would be as large as its weights)."""
    layers = ctx.adapter.layers()
    low, high = min(ctx.layer_indices), max(ctx.layer_indices)
    calls, hidden, _ = replay_start(ctx.model, layers, low, high, ctx.batches)
    for index in tqdm(range(low, high + 1), desc="obs", disable=not ctx.progress, leave=False):
        layer = layers[index]
        specs = ctx.specs.get(index, []) if index in ctx.layer_indices else []
        sums: dict[str, torch.Tensor] = {}
        with gram_sums(layer, specs, sums), resident(layer), torch.no_grad():
            device = execution_device(layer)
            for sample, call in enumerate(calls[index]):
                hidden[sample] = call.run(layer, hidden[sample].to(device)).cpu()
        for spec in specs:
            yield (index, spec.kind), sums.pop(spec.gate_module) / ctx.batches.numel()


@contextmanager
def gram_sums(layer: nn.Module, specs: list[GroupSpec], sums: dict[str, torch.Tensor]) -> Iterator[None]:
    """While the block runs, add [x; 1] [x; 1]^T (float64, CPU) of every token that enters each spec's output
    projection into `sums[gate_module]`, in place."""

    def accumulate(module, args, name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        z = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        if name not in sums:
            sums[name] = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
        sums[name].addmm_(z.T, z)

    handles = [layer.get_submodule(spec.gate_module).register_forward_pre_hook(
        partial(accumulate, name=spec.gate_module)) for spec in specs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@register_criterion("obs")
class OptimalBrainSurgeon(Criterion):
    """Structured OBS errors removed greedily in batches (module docstring); no gradients needed."""

    Settings = ObsSettings

    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        specs = {(layer, spec.kind): spec for layer, spec in ctx.items()}
        scores = {}
        for (layer, kind), gram in output_grams(ctx):
            spec = specs[(layer, kind)]
            weight = ctx.param(layer, f"{spec.gate_module}.weight")
            scores[(layer, kind)] = greedy_obs_errors(weight, gram, spec.gate_block, self.settings.steps,
                                                      self.settings.damp)
        return {key: scores[key] for key in specs}


def projection_grams(model: nn.Module, adapter, layer_indices: list[int], batches: torch.Tensor,
                     progress: bool = False) -> dict[LayerKind, torch.Tensor]:
    """Every pruned output projection's Gram matrix of [x; 1] per token over the dense model, in float32: what
    the profile search (`hywia.pruning.search`) fits its variants' compensation on."""
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layer_indices}
    ctx = ScoringContext(model, adapter, layer_indices, specs, batches, {}, progress=progress)
    return {key: gram.float() for key, gram in output_grams(ctx)}

"""Criteria: statistics (+ the groups an adapter declares) -> one score per group. One registry, by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..models import Adapter, GroupSpec, LayerKind, TensorSlice
from ..offload import resident
from ..settings import NoSettings, format_spec, parse_spec
from .statistics import Statistics, blocks


@dataclass
class ScoringContext:
    """Everything a criterion may read. `keep` says how many groups of each (layer, kind) stay under a uniform
    allocation; `allocate`, when set, computes the counts of a score-dependent (global) allocation instead.
    `kept_groups`, when set, gives the groups a plan made from given scores keeps, allocated and selected as the
    pipeline will (the plan lives in hywia.pruning, above the criteria)."""

    model: nn.Module
    adapter: Adapter
    layer_indices: list[int]
    specs: dict[int, list[GroupSpec]]
    batches: torch.Tensor
    keep: dict[LayerKind, int]
    seed: int = 0
    stats: Statistics | None = None
    progress: bool = True
    allocate: Callable[[dict[LayerKind, torch.Tensor]], dict[LayerKind, int]] | None = None
    compensate: str = "none"  # what surgery will put in place of a removed group's output (see pruning.compensate)
    kept_groups: Callable[[dict[LayerKind, torch.Tensor]], dict[LayerKind, list[int]]] | None = None
    ridge: float = 1e-2  # the least-squares compensation's ridge, in units of the mean diagonal
    attention_weight: float = 1.0  # the global allocation's weight of attention groups' scores (allocate_global)

    def param(self, layer: int, name: str) -> torch.Tensor:
        """A weight of the layer (name relative to it) as float; loaded for the call when accelerate offloads it."""
        module = self.model.get_submodule(self.adapter.layer_name(layer))
        with resident(module):
            return module.get_parameter(name).detach().float()

    def full_name(self, layer: int, s: TensorSlice) -> str:
        return f"{self.adapter.layer_name(layer)}.{s.param}"

    def items(self):
        """(layer, spec) for every pruned layer and group kind."""
        for layer in self.layer_indices:
            for spec in self.specs[layer]:
                yield layer, spec


class Criterion(ABC):
    """Scores every group; higher means more important (kept first).

    A criterion with settings of its own declares them as a frozen dataclass `Settings`; it is constructed from
    their keywords (`HywiaFusion(steps=8)`) or from a spec (`get_criterion("hywia:steps=8")`).
    """

    name: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False
    Settings: ClassVar[type] = NoSettings

    def __init__(self, **settings) -> None:
        self.settings = self.Settings(**settings)

    @property
    def spec(self) -> str:
        """Name and every setting, as `get_criterion` reads it back."""
        return format_spec(self.name, self.settings)

    @abstractmethod
    def score(self, ctx: ScoringContext) -> dict[LayerKind, torch.Tensor]:
        """One score per group, for every (layer, kind) in `ctx`."""

    def summary(self) -> dict:
        """What the report says of this criterion beyond its name (the fusion's learned blend, say)."""
        return {}

    def check_windows(self, count: int) -> None:
        """Refuse, before any calibration, a number of calibration windows the criterion cannot work with."""

    @property
    def gradient_folds(self) -> int:
        """Into how many folds of the windows the calibration pass must also split the gradient terms
        (`Statistics.fold_taylor`); 1: none."""
        return 1


_CRITERIA: dict[str, Callable[..., Criterion]] = {}


def register_criterion(name: str):
    def decorator(cls):
        cls.name = name
        _CRITERIA[name] = cls
        return cls

    return decorator


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def criterion_settings() -> dict[str, type]:
    """Each registered criterion's settings class, by name."""
    return {name: _CRITERIA[name].Settings for name in available_criteria()}


def get_criterion(spec: str) -> Criterion:
    """A criterion from its spec, `name[:value][:key=value]...` (hywia.settings), e.g. `hywia:steps=48:lr=0.05`."""
    name, settings = parse_spec(spec, criterion_settings(), "criterion")
    return _CRITERIA[name](**dataclasses.asdict(settings))


def reduce_groups(
    ctx: ScoringContext, per_weight: Callable[[int, TensorSlice], torch.Tensor | None], mode: str
) -> dict[LayerKind, torch.Tensor]:
    """Sum a per-weight saliency into groups: `fine` = sum of |s|, `coarse` = sum over slices of |sum of s|.

    `per_weight` may return None for a slice the criterion does not score (e.g. biases for activation criteria).
    """
    scores = {}
    for layer, spec in ctx.items():
        total = torch.zeros(spec.count, dtype=torch.float64)
        for s in spec.slices:
            saliency = per_weight(layer, s)
            if saliency is None:
                continue
            b = blocks(saliency, s, spec.count)
            reduced = b.abs().sum(1) if mode == "fine" else b.sum(1).abs()
            total += reduced.double().cpu()
        scores[(layer, spec.kind)] = total
    return scores


def normalise(scores: dict[LayerKind, torch.Tensor]) -> dict[LayerKind, torch.Tensor]:
    """Each (layer, kind) scaled to mean 1, so scores of different granularities are comparable."""
    return {key: s / s.mean().clamp_min(1e-30) for key, s in scores.items()}

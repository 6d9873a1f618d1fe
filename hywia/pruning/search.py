"""Profile search: how much each pruned layer gives, chosen by the loss of the assembled model.

The global allocation ranks groups by score per parameter, so a layer's share follows from scores that each judge a
group alone. EvoPress (Sieberling et al., 2024) and Tyr-the-Pruner (NeurIPS 2025) instead search the per-layer
profile itself: every layer has pruned variants at several levels, and an evolutionary search assembles profiles
and keeps the one whose model stays closest to the dense model on calibration text. This is that search over the
kept counts of every (layer, kind):

- a variant of a (layer, kind) keeps its highest-scored groups (the criterion's order, selected as the plan will)
  and fills its removed groups' inputs as the compensation will: least squares from the kept inputs and a
  constant (`lstsq`, the fixed ridge; `hywia.importance.refit`), their mean (`bias`) or zero (`none`), fitted on
  the dense model's inputs over every calibration window;
- the search starts from the global allocation's profile and runs a (1 + lambda) evolution: each child moves
  `step` groups from one (layer, kind) to another whose step costs the same number of parameters (so every
  profile removes exactly the start's share), one to three moves per child; the children are ranked on one
  window, the best `survivors` are judged on all `windows`, and the best of them replaces the parent only if it is
  closer to the dense model (EvoPress's multi-step selection, with an elitist parent);
- closeness is the KL divergence of the dense model's next-token distribution to the candidate's, per token
  (EvoPress's fitness), on the first `windows` calibration windows.

Choices of this implementation: the levels are the criterion's own orders (Tyr builds each variant by local
pruning at its sparsity), the variants' compensation is fitted on the dense inputs (the final prune's compensation
fits on the model as pruned so far, with its held-out ridge), and every generation reads the same windows. Every
pruned projection's Gram matrix is held (float32, about 0.3 GB on SmolLM2-135M), and every window's dense
log-probabilities (vocabulary x tokens floats each).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.capture import standing_aside
from ..calibration.prediction import InputPrediction, input_prediction
from ..models import Adapter, GroupSpec, LayerKind
from ..offload import execution_device
from .plan import (ATTENTION_WEIGHT, GLOBAL_FLOOR, _floor_units, _rounding_step, _unit, check_global_settings,
                   group_cost, select)

Profile = dict[LayerKind, int]


@dataclass(frozen=True)
class ProfileSearch:
    """`--allocation search` settings: `floor` and `attention_weight` as the global allocation's (they make the
    start profile); `generations` of `offspring` children, `survivors` of them judged on all `windows` (the first
    calibration windows); an MLP moves `1/levels` of its channels per step, attention one head per KV group (or one
    KV group)."""

    floor: float = GLOBAL_FLOOR
    attention_weight: float = ATTENTION_WEIGHT
    generations: int = 50
    offspring: int = 8
    survivors: int = 2
    windows: int = 4
    levels: int = 16

    def __post_init__(self) -> None:
        check_global_settings(self.floor, self.attention_weight)
        for name in ("offspring", "survivors", "windows", "levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.survivors > self.offspring:
            raise ValueError(f"survivors ({self.survivors}) cannot exceed offspring ({self.offspring})")


@dataclass(frozen=True)
class _Slot:
    """One (layer, kind) the search moves: its spec, the groups one step moves, and its bounds."""

    spec: GroupSpec
    step: int
    least: int  # the floor's kept count
    step_cost: int  # parameters one step moves


def _slots(adapter: Adapter, layer_indices: list[int], settings: ProfileSearch, round_to: int) -> dict[LayerKind, _Slot]:
    """Every pruned (layer, kind) with its step: attention by one removal unit, an MLP by `1/levels` of its
    channels rounded to the kept-width multiple, so a profile reached by steps keeps the start's rounding."""
    layers = adapter.layers()
    slots = {}
    for i in layer_indices:
        for spec in adapter.group_specs(layers[i]):
            unit = _unit(adapter, layers[i], spec)
            if spec.kind == "mlp":
                granule = _rounding_step(spec, unit, round_to) or unit
                step = max(granule, round(spec.count / settings.levels / granule) * granule)
            else:
                step = unit
            least = _floor_units(spec.count // unit, settings.floor) * unit
            slots[(i, spec.kind)] = _Slot(spec, step, least, step * group_cost(layers[i], spec))
    return slots


def _mutate(parent: Profile, slots: dict[LayerKind, _Slot], rng: random.Random) -> Profile:
    """The parent with one to three moves of one step each, from a (layer, kind) above its floor to another of
    the same step cost below its full width: the removed parameters stay exactly the parent's."""
    child = dict(parent)
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        classes: dict[int, tuple[list[LayerKind], list[LayerKind]]] = {}
        for key, slot in slots.items():
            donors, receivers = classes.setdefault(slot.step_cost, ([], []))
            if child[key] - slot.step >= slot.least:
                donors.append(key)
            if child[key] + slot.step <= slot.spec.count:
                receivers.append(key)
        moves = [([d for d in donors if any(r != d for r in receivers)], receivers)
                 for donors, receivers in classes.values()]
        moves = [(donors, receivers) for donors, receivers in moves if donors]
        if not moves:
            break
        donors, receivers = rng.choice(moves)
        donor = rng.choice(donors)
        receiver = rng.choice([key for key in receivers if key != donor])
        child[donor] -= slots[donor].step
        child[receiver] += slots[receiver].step
    return child


class ProfileFitness:
    """KL divergence of the dense model's next-token distribution to a profile's, per token, on each of the first
    windows (module docstring). Every (layer, kind) variant and every window's value for a profile is computed
    once. After `rebase(parent)`, a profile that differs from the parent first at layer a starts each window from
    the parent's input to layer a: the layers below compute what they computed for the parent."""

    def __init__(self, model: nn.Module, adapter: Adapter, scores: dict[LayerKind, torch.Tensor],
                 slots: dict[LayerKind, _Slot], windows: torch.Tensor, grams: dict[LayerKind, torch.Tensor],
                 compensation: str, ridge: float) -> None:
        self.model, self.adapter, self.scores, self.slots = model, adapter, scores, slots
        self.windows, self.grams, self.compensation, self.ridge = windows, grams, compensation, ridge
        self.evaluations = 0
        self._dense: list[torch.Tensor] = []
        self._variants: dict[tuple[LayerKind, int], InputPrediction | None] = {}
        self._values: dict[tuple, list[float]] = {}
        self._inputs: dict[tuple, dict[int, dict[int, torch.Tensor]]] = {}  # profile -> window -> layer -> input
        self._base: Profile | None = None
        self._arity = 0  # a decoder layer's output: a tensor (0) or a tuple of this many
        self._pruned = range(min(layer for layer, _ in slots), max(layer for layer, _ in slots) + 1)

    def __call__(self, profile: Profile, windows: int) -> float:
        """Mean KL over the first `windows` windows."""
        key = _key(profile)
        values = self._values.setdefault(key, [])
        while len(self._dense) < windows:  # before any variant is installed
            self._dense.append(self._log_probs(len(self._dense)))
        if len(values) < windows:
            with self._installed(profile):
                for index in range(len(values), windows):
                    values.append(self._kl(index, profile, self._inputs.setdefault(key, {}).setdefault(index, {})))
        return sum(values[:windows]) / windows

    def rebase(self, parent: Profile) -> None:
        """Later profiles start from `parent`'s layer inputs (class docstring); those of other profiles are freed."""
        self._base = dict(parent)
        self._inputs = {_key(parent): self._inputs.get(_key(parent), {})}

    def _first_changed(self, profile: Profile, index: int) -> int | None:
        """The lowest layer where `profile` differs from the base, if the base's inputs of window `index` reach
        it; None: run the whole model."""
        if self._base is None:
            return None
        changed = [layer for (layer, kind), kept in profile.items() if kept != self._base[(layer, kind)]]
        first = min(changed, default=None)
        base_inputs = self._inputs.get(_key(self._base), {}).get(index, {})
        return first if first is not None and first > 0 and first in base_inputs else None

    def _variant(self, key: LayerKind, kept_count: int) -> InputPrediction | None:
        """What replaces the removed inputs of `key` when it keeps `kept_count` groups; None when it keeps all."""
        if (key, kept_count) not in self._variants:
            spec = self.slots[key].spec
            kept = select(self.adapter, {key: self.scores[key]}, {key: kept_count}).layers[key[0]][key[1]]
            self._variants[(key, kept_count)] = _replacement(spec, kept, self.grams.get(key), self.compensation,
                                                             self.ridge)
        return self._variants[(key, kept_count)]

    @contextmanager
    def _installed(self, profile: Profile) -> Iterator[None]:
        """While the block runs, every (layer, kind) of `profile` has its variant's removed inputs replaced."""
        layers = self.adapter.layers()
        with ExitStack() as hooks:  # a hook's handle removes it on exit
            for key, kept_count in profile.items():
                variant = self._variant(key, kept_count)
                if variant is not None:
                    module = layers[key[0]].get_submodule(self.slots[key].spec.gate_module)
                    hooks.enter_context(module.register_forward_pre_hook(variant.pre_hook))
            yield

    @torch.no_grad()
    def _log_probs(self, index: int, start: int | None = None,
                   inputs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Log-probabilities of window `index` under the installed variants. From layer `start` on (the layers
        below standing aside and the one under it handing over the base's input); the inputs of the pruned layers
        from there up are recorded into `inputs`, the base's below."""
        layers = self.adapter.layers()
        ids = self.windows[index][None].to(execution_device(self.model))
        with ExitStack() as hooks:  # a hook's handle removes it on exit
            if inputs is not None:
                low = self._pruned.start if start is None else start
                if start is not None:
                    base = self._inputs[_key(self._base)][index]
                    inputs.update({layer: base[layer] for layer in range(self._pruned.start, start)})
                for layer in range(low, self._pruned.stop):
                    hooks.enter_context(layers[layer].register_forward_pre_hook(
                        partial(_record, into=inputs, layer=layer), with_kwargs=True))
            hooks.enter_context(layers[0].register_forward_hook(self._note_arity))
            if start is not None:  # the model's forward starts at layer `start`, from its input in the base
                hooks.enter_context(standing_aside(layers, start - 1,
                                                   lambda: self._inputs[_key(self._base)][index][start], self._arity))
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        return F.log_softmax(logits, -1)

    def _note_arity(self, module: nn.Module, args: tuple, output) -> None:
        self._arity = len(output) if isinstance(output, tuple) else 0

    def _kl(self, index: int, profile: Profile, inputs: dict[int, torch.Tensor]) -> float:
        dense = self._dense[index]
        self.evaluations += 1
        start = self._first_changed(profile, index)
        return float((dense.exp() * (dense - self._log_probs(index, start, inputs))).sum(-1).mean())


def _key(profile: Profile) -> tuple:
    return tuple(sorted(profile.items()))


def _record(module: nn.Module, args: tuple, kwargs: dict, into: dict[int, torch.Tensor], layer: int) -> None:
    into[layer] = (args[0] if args else kwargs["hidden_states"]).detach()


def _replacement(spec: GroupSpec, kept: list[int], gram: torch.Tensor | None, compensation: str,
                 ridge: float) -> InputPrediction | None:
    """The removed inputs' replacement as `compensation` makes it: least squares, the mean, or zero."""
    kept_columns, removed_columns = spec.gate_columns(kept)
    if not removed_columns.numel():
        return None
    if compensation == "lstsq":
        return input_prediction(gram.double(), spec, kept, ridge, torch.float32)
    weights = torch.zeros(kept_columns.numel() + 1, removed_columns.numel())
    if compensation == "bias":  # the constant's row of the Gram matrix holds every input's mean
        weights[-1] = (gram[-1, removed_columns] / gram[-1, -1]).float()
    return InputPrediction(kept_columns, removed_columns, weights)


def search_profile(model: nn.Module, adapter: Adapter, layer_indices: list[int], scores: dict[LayerKind, torch.Tensor],
                   start: Profile, batches: torch.Tensor, compensation: str, settings: ProfileSearch, *,
                   grams: dict[LayerKind, torch.Tensor] | None = None, round_to: int = 1, ridge: float = 1e-2,
                   seed: int = 0, progress: bool = False) -> tuple[Profile, dict]:
    """The kept counts the search finds from `start` (module docstring), and a record of the search: the KL of
    the start and of the result on the fitness windows, each improvement as [generation, KL], the evaluations
    made and the (layer, kind)s moved.
    `grams`: every pruned projection's Gram matrix of [x; 1] per token over `batches` on the dense model
    (`hywia.importance.obs.projection_grams`), needed unless the compensation is `none`."""
    if compensation != "none" and grams is None:
        raise ValueError(f"the search's {compensation!r} variants need the projections' Gram matrices")
    slots = _slots(adapter, layer_indices, settings, round_to)
    windows = min(settings.windows, len(batches))
    fitness = ProfileFitness(model, adapter, scores, slots, batches[:windows], grams or {}, compensation, ridge)
    rng = random.Random(seed)
    parent, parent_fitness = dict(start), fitness(start, windows)
    fitness.rebase(parent)
    start_fitness, trace = parent_fitness, []
    for generation in tqdm(range(settings.generations), desc="profile search", disable=not progress, leave=False):
        children = [_mutate(parent, slots, rng) for _ in range(settings.offspring)]
        children = [child for child in children if child != parent]
        if not children:
            break
        ranked = sorted(children, key=lambda child: fitness(child, 1))[: settings.survivors]
        best = min(ranked, key=lambda child: fitness(child, windows))
        if fitness(best, windows) < parent_fitness:
            parent, parent_fitness = best, fitness(best, windows)
            trace.append([generation + 1, parent_fitness])
        fitness.rebase(parent)
    moved = sorted(f"{layer}:{kind}" for (layer, kind), kept in parent.items() if kept != start[(layer, kind)])
    record = {"start_kl": start_fitness, "kl": parent_fitness, "windows": windows, "improvements": len(trace),
              "evaluations": fitness.evaluations, "moved": moved, "trace": trace}
    return parent, record

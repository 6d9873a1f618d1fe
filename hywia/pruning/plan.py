"""The pruning plan: per pruned layer, the kept indices of each group kind — the contract between scoring and
surgery. Saved as plan.json beside the model; the same plan applied as a zero-mask or physically gives the same
model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidRequestError
from ..models import Adapter, GroupSpec, LayerKind, TensorSlice

GLOBAL_FLOOR = 0.25  # share of each (layer, kind) that global allocation keeps by default
ATTENTION_WEIGHT = 16.0  # how many times attention groups' scores count in it by default (methods.GlobalAllocation)
GLOBAL_TOLERANCE = 0.005  # share of the decoder parameters global allocation may miss the target by


def check_global_settings(floor: float, attention_weight: float) -> None:
    """The global allocation's settings, checked where a spec gives them (`global` and the start of `search`)."""
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must lie in [0, 1), got {floor}")
    if not attention_weight > 0:
        raise ValueError(f"attention_weight must be > 0, got {attention_weight}")


@dataclass
class PruningPlan:
    attention: str
    layers: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"attention": self.attention, "layers": {str(k): v for k, v in sorted(self.layers.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        return cls(data["attention"], {int(k): v for k, v in data["layers"].items()})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> "PruningPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Layers to prune from `A:B` (a Python slice: either end may be empty, negatives count from the end); the
    default keeps the first ~10% and last 2. Bounds outside the model and empty ranges are refused, not clamped."""
    if spec is None:
        start, stop = max(1, round(n_layers * 0.1)), n_layers - 2
    else:
        first, colon, last = spec.strip().partition(":")
        try:
            if not colon or ":" in last:
                raise ValueError(spec)
            start = int(first) if first.strip() else 0
            stop = int(last) if last.strip() else n_layers
        except ValueError as exc:
            raise InvalidRequestError(f"--layers must look like A:B (either may be empty, negatives count from the "
                                      f"end, e.g. 2:-2 or 4:), got {spec!r}") from exc
        outside = [v for v in (start, stop) if not -n_layers <= v <= n_layers]
        if outside:
            raise InvalidRequestError(f"--layers {spec}: bound {outside[0]} is outside the model's {n_layers} layers "
                                      f"(bounds run from {-n_layers} to {n_layers})")
        start, stop = (v + n_layers if v < 0 else v for v in (start, stop))
    indices = list(range(start, stop))
    if not indices:
        raise InvalidRequestError(f"--layers {spec or '(default)'} selects no layer of the model's {n_layers} layers")
    return indices


def group_cost(layer: torch.nn.Module, spec: GroupSpec) -> int:
    """Parameters one group of this kind owns."""
    return sum(_slice_cost(layer.get_parameter(s.param), s) for s in spec.slices)


def _slice_cost(param: torch.Tensor, s: TensorSlice) -> int:
    """Entries one group owns in a slice: `block` positions along `dim` (a fused tensor holds several slices)."""
    return param.numel() // param.shape[s.dim] * s.block


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise InvalidRequestError(f"ratio must lie in [0, 1), got {ratio}")


def _floor_units(units: int, floor: float) -> int:
    """Removal units a (layer, kind) keeps: `floor` of them, and always at least one."""
    return max(1, math.ceil(floor * units))


def max_removable_share(adapter: Adapter, layer_indices: list[int], floor: float) -> float:
    """The largest share of all decoder parameters that can go from these layers, from their shapes alone, when
    every (layer, kind) keeps `floor` of its removal units (at least one)."""
    layers = adapter.layers()
    removable = 0
    for i in layer_indices:
        for spec in adapter.group_specs(layers[i]):
            unit = _unit(adapter, layers[i], spec)
            units = spec.count // unit
            removable += (units - _floor_units(units, floor)) * unit * group_cost(layers[i], spec)
    return removable / adapter.num_decoder_params()


def _layer_span(layer_indices: list[int]) -> str:
    return f"--layers {layer_indices[0]}:{layer_indices[-1] + 1}"


def check_uniform_reachable(adapter: Adapter, layer_indices: list[int], ratio: float) -> None:
    """Refuse a uniform ratio that would take every unit of some kind from a pruned layer (its last head per KV
    group, last KV group or last MLP channel)."""
    _check_ratio(ratio)
    most = max_removable_share(adapter, layer_indices, floor=0.0)
    if ratio > most:
        raise InvalidRequestError(
            f"ratio {ratio} would empty the pruned layers: {_layer_span(layer_indices)} can give at most "
            f"{most:.3f} of the decoder parameters; widen --layers or lower --ratio"
        )


def check_global_reachable(adapter: Adapter, layer_indices: list[int], ratio: float,
                           floor: float = GLOBAL_FLOOR) -> None:
    """Refuse, from the shapes alone and so before calibration, a global ratio that the per-layer floor blocks."""
    _check_ratio(ratio)
    most = max_removable_share(adapter, layer_indices, floor)
    if ratio - GLOBAL_TOLERANCE > most:
        uniform_most = max_removable_share(adapter, layer_indices, floor=0.0)
        alternative = f", or use --allocation uniform (up to {uniform_most:.3f})" if ratio <= uniform_most else ""
        raise InvalidRequestError(
            f"ratio {ratio} cannot be reached with --allocation global: every pruned layer keeps {floor:.0%} of its "
            f"heads and channels, so {_layer_span(layer_indices)} can give at most {most:.3f} of the decoder "
            f"parameters; lower --ratio, widen --layers{alternative}"
        )


DEFAULT_ROUND_TO = 8  # the kept-width multiple when --round-to is not given: GEMM kernels' vector width on CPUs


def check_round_to(adapter: Adapter, layer_indices: list[int], round_to: int) -> None:
    """Refuse a --round-to not below some pruned layer's MLP width: there it would round nothing, silently."""
    if round_to < 1:
        raise InvalidRequestError(f"--round-to must be >= 1, got {round_to}")
    if round_to == 1:
        return
    narrowest = _narrowest_mlp(adapter, layer_indices)
    if narrowest is not None and narrowest[1] <= round_to:
        raise InvalidRequestError(
            f"--round-to {round_to} is not below the MLP width of layer {narrowest[0]} ({narrowest[1]} channels), "
            "so it would round nothing there; use a smaller --round-to or prune without it"
        )


def resolve_round_to(adapter: Adapter, layer_indices: list[int], round_to: int | None) -> int:
    """The --round-to a run uses: a given value as is (checked by `check_round_to`); none given, DEFAULT_ROUND_TO
    where every pruned MLP is wider than it, else 1, so the default never refuses a (tiny) model."""
    if round_to is not None:
        return round_to
    narrowest = _narrowest_mlp(adapter, layer_indices)
    return DEFAULT_ROUND_TO if narrowest is None or narrowest[1] > DEFAULT_ROUND_TO else 1


def _narrowest_mlp(adapter: Adapter, layer_indices: list[int]) -> tuple[int, int] | None:
    """(layer, channels) of the pruned layer with the fewest MLP channels; None when no pruned layer has an MLP."""
    layers = adapter.layers()
    widths = {i: spec.count for i in layer_indices for spec in adapter.group_specs(layers[i]) if spec.kind == "mlp"}
    narrowest = min(widths, key=widths.get, default=None)
    return None if narrowest is None else (narrowest, widths[narrowest])


def check_plan_request(
    adapter: Adapter, layers: str | None, ratio: float, round_to: int, global_floor: float | None
) -> list[int]:
    """The layers to prune, once `--layers`, `--round-to` and the ratio are known to fit the model's shapes:
    everything that can be refused without scores, refused before calibration. `global_floor` is the global
    allocation's floor, None for the uniform allocation."""
    layer_indices = parse_layers(layers, len(adapter.layers()))
    check_round_to(adapter, layer_indices, round_to)
    check_uniform_reachable(adapter, layer_indices, ratio)
    if global_floor is not None:
        check_global_reachable(adapter, layer_indices, ratio, floor=global_floor)
    return layer_indices


def _unit(adapter: Adapter, layer: torch.nn.Module, spec: GroupSpec) -> int:
    """Groups removed together: one query head from every KV group, otherwise a single group."""
    return _kv_count(adapter, layer) if spec.kind == "head" else 1


def _rounding_step(spec: GroupSpec, unit: int, round_to: int) -> int | None:
    """The kept-count step that makes the kept width (groups x `gate_block` input columns of the output projection)
    a multiple of `round_to` in whole units; None where it changes nothing (heads whose head_dim is already a
    multiple of `round_to`) or where the layer cannot hold one step."""
    step = math.lcm(unit, round_to // math.gcd(round_to, spec.gate_block))
    return step if step > unit and spec.count > step else None


def _round_keep(keep: int, spec: GroupSpec, unit: int, round_to: int) -> int:
    """A kept count rounded to the nearest `_rounding_step` multiple, within [unit, count]."""
    step = _rounding_step(spec, unit, round_to)
    if step is not None:
        keep = max(round(keep / step) * step, step)
    return min(max(keep, unit), spec.count)


def _round_keep_towards(keep: dict[LayerKind, int], adapter: Adapter, layer_indices: list[int], round_to: int,
                        shortfall: float) -> None:
    """Round every kept count to its `_rounding_step`, each down or up so that the parameters removed so far stay
    closest to the unrounded allocation's plus `shortfall` (what it missed the target by): rounding errors cancel
    across layers instead of adding up, so the achieved share stays at the request."""
    layers = adapter.layers()
    drift = -shortfall  # rounded removal so far - unrounded removal so far - shortfall
    for i in layer_indices:
        for spec in adapter.group_specs(layers[i]):
            key, unit = (i, spec.kind), _unit(adapter, layers[i], spec)
            step = _rounding_step(spec, unit, round_to)
            if step is None:
                continue
            below = max(keep[key] // step * step, step)
            options = {below, min(below + step, spec.count)} if below < keep[key] else {below}
            cost = group_cost(layers[i], spec)
            chosen = min(sorted(options), key=lambda kept: abs(drift + (keep[key] - kept) * cost))
            drift += (keep[key] - chosen) * cost
            keep[key] = chosen


def log_depth_weights(layer_indices: list[int]) -> dict[int, float]:
    """Each pruned layer's share of the removal relative to the mean, growing with the log of its position in the
    pruned range (1, 2, ... n -> log 2, log 3, ... log(n + 1), scaled to mean 1): SlimGPT's incremental pruning
    ratio, which spares the early layers whose errors every later layer carries."""
    raw = [math.log(position + 2) for position in range(len(layer_indices))]
    mean = sum(raw) / len(raw)
    return {layer: value / mean for layer, value in zip(layer_indices, raw)}


def allocate_uniform(
    adapter: Adapter, layer_indices: list[int], ratio: float, round_to: int = 1,
    depth_weights: dict[int, float] | None = None,
) -> dict[LayerKind, int]:
    """How many groups of each (layer, kind) to keep so that `ratio` of all decoder parameters goes.

    Every pruned layer loses the same share of its attention (rounded to whole heads per KV group) and the MLP
    channels absorb the rest, so the achieved share matches the request to within a few channels. With
    `depth_weights` (`log_depth_weights`), layer i's shares are the common ones times its weight instead (each
    capped so that one unit of every kind stays), the MLP share solved so that the total still matches.
    """
    check_uniform_reachable(adapter, layer_indices, ratio)
    layers = adapter.layers()
    specs = {i: adapter.group_specs(layers[i]) for i in layer_indices}
    weights = depth_weights or {i: 1.0 for i in layer_indices}
    target = ratio * adapter.num_decoder_params()
    prunable = sum(group_cost(layers[i], s) * s.count for i in layer_indices for s in specs[i])
    share = target / prunable
    keep: dict[LayerKind, int] = {}
    removed = 0.0
    for i in layer_indices:
        for spec in specs[i]:
            if spec.kind == "mlp":
                continue
            unit = _unit(adapter, layers[i], spec)
            units = spec.count // unit
            drop = min(round(share * weights[i] * units), units - 1)
            keep[(i, spec.kind)] = _round_keep((units - drop) * unit, spec, unit, round_to)
            removed += (spec.count - keep[(i, spec.kind)]) * group_cost(layers[i], spec)
    mlps = [(i, spec, group_cost(layers[i], spec)) for i in layer_indices for spec in specs[i] if spec.kind == "mlp"]

    def mlp_removed(mlp_share: float) -> float:
        return sum(min(mlp_share * weights[i], 1.0) * spec.count * cost for i, spec, cost in mlps)

    mlp_params = sum(spec.count * cost for _, spec, cost in mlps)
    mlp_share = min(max((target - removed) / mlp_params, 0.0), 1.0) if mlp_params else 0.0
    if depth_weights and mlp_params:  # bisection: the capped removal grows monotonically with the common share
        low, mlp_share = 0.0, 1.0 / min(weights[i] for i, _, _ in mlps)
        for _ in range(60):
            middle = (low + mlp_share) / 2
            low, mlp_share = (middle, mlp_share) if mlp_removed(middle) < target - removed else (low, middle)
    for i, spec, _ in mlps:
        kept = spec.count - round(min(mlp_share * weights[i], 1.0) * spec.count)
        keep[(i, "mlp")] = _round_keep(kept, spec, 1, round_to)
    return keep


def allocate_global(
    adapter: Adapter,
    layer_indices: list[int],
    ratio: float,
    scores: dict[LayerKind, torch.Tensor],
    floor: float = GLOBAL_FLOOR,
    round_to: int = 1,
    attention_weight: float = 1.0,
) -> dict[LayerKind, int]:
    """Rank the groups of all pruned layers together by score per parameter and remove the cheapest first.

    Criteria return scores on a scale comparable across layers (Taylor terms estimate a change of the loss). Within a layer and kind, the
    removal order is the score order, so the plan `select` makes from these counts is exactly the greedy choice.
    Every (layer, kind) keeps at least `floor` of its groups (and at least one unit), so no layer is emptied.
    Attention groups' scores count `attention_weight` times in the ranking: a prior that removing a head costs more
    (or less) than the calibration scores say; the order within a layer stays the scores'.
    """
    _check_ratio(ratio)
    layers = adapter.layers()
    total = adapter.num_decoder_params()
    target = ratio * total
    candidates = []  # (score per parameter, cost, layer-kind)
    keep: dict[LayerKind, int] = {}
    for i in layer_indices:
        for spec in adapter.group_specs(layers[i]):
            key, unit, cost = (i, spec.kind), _unit(adapter, layers[i], spec), group_cost(layers[i], spec)
            keep[key] = spec.count
            score = scores[key].double() * (1.0 if spec.kind == "mlp" else attention_weight)
            if unit > 1:  # the r-th removal takes the r-th weakest head of every KV group
                score = score.view(unit, -1).sort(dim=1).values.sum(0)
            floor_units = _floor_units(score.numel(), floor)
            for value in score.sort().values[: score.numel() - floor_units].tolist():
                candidates.append((value / (cost * unit), cost * unit, key, unit))
    candidates.sort(key=lambda c: c[0])
    removed = 0.0
    for _, cost, key, unit in candidates:
        if removed + cost > target + GLOBAL_TOLERANCE * total:
            continue  # would overshoot: a cheaper group further down the ranking may still fit
        keep[key] -= unit
        removed += cost
    if removed < target - GLOBAL_TOLERANCE * total:  # groups too coarse to land near the target
        raise InvalidRequestError(
            f"ratio {ratio} cannot be reached with every layer keeping {floor:.0%} of its groups; "
            "widen --layers or lower --ratio"
        )
    if round_to > 1:
        _round_keep_towards(keep, adapter, layer_indices, round_to, target - removed)
    return keep


def _kv_count(adapter: Adapter, layer: torch.nn.Module) -> int:
    """KV groups the layer's query heads are split over, as its adapter's "head" spec declares."""
    return next(spec.kv_groups for spec in adapter.group_specs(layer) if spec.kind == "head")


def select(
    adapter: Adapter, scores: dict[LayerKind, torch.Tensor], keep: dict[LayerKind, int]
) -> PruningPlan:
    """Keep the highest-scored groups; query heads are chosen within each KV group, the same number in each."""
    plan = PruningPlan(adapter.attention)
    layers = adapter.layers()
    for (layer, kind), score in scores.items():
        n_keep = keep[(layer, kind)]
        if kind == "head":
            n_kv = _kv_count(adapter, layers[layer])
            per_group = score.numel() // n_kv
            grouped = score.view(n_kv, per_group)
            top = grouped.sort(dim=1, descending=True, stable=True).indices[:, : n_keep // n_kv]
            kept = (top + torch.arange(n_kv)[:, None] * per_group).reshape(-1)
        else:
            kept = score.sort(descending=True, stable=True).indices[:n_keep]
        plan.layers.setdefault(layer, {})[kind] = sorted(kept.tolist())
    return plan

"""The pruning plan: per pruned layer, the kept indices of each group kind — the contract between scoring and
surgery. Saved as plan.json beside the model; the same plan applied as a zero-mask or physically gives the same
model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidRequestError
from ..models import Adapter, GroupSpec

LayerKind = tuple[int, str]


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
    """Layers to prune from `A:B` (Python slice, negatives allowed); default keeps the first ~10% and last 2."""
    if spec is None:
        start, stop = max(1, round(n_layers * 0.1)), n_layers - 2
    else:
        try:
            first, _, last = spec.partition(":")
            start = int(first) if first else 0
            stop = int(last) if last else n_layers
        except ValueError as exc:
            raise InvalidRequestError(f"--layers must look like A:B, got {spec!r}") from exc
        start, stop = (v + n_layers if v < 0 else v for v in (start, stop))
    indices = list(range(max(start, 0), min(stop, n_layers)))
    if not indices:
        raise InvalidRequestError(f"--layers {spec!r} selects no layer of a model with {n_layers} layers")
    return indices


def group_cost(layer: torch.nn.Module, spec: GroupSpec) -> int:
    """Parameters one group of this kind owns."""
    return sum(layer.get_parameter(s.param).numel() // spec.count for s in spec.slices)


def allocate_uniform(adapter: Adapter, layer_indices: list[int], ratio: float) -> dict[LayerKind, int]:
    """How many groups of each (layer, kind) to keep so that `ratio` of all decoder parameters goes.

    Every pruned layer loses the same share of its attention (rounded to whole heads per KV group) and the MLP
    channels absorb the rest, so the achieved share matches the request to within a few channels.
    """
    if not 0.0 <= ratio < 1.0:
        raise InvalidRequestError(f"ratio must lie in (0, 1), got {ratio}")
    layers = adapter.layers()
    specs = {i: adapter.group_specs(layers[i]) for i in layer_indices}
    target = ratio * adapter.num_decoder_params()
    prunable = sum(group_cost(layers[i], s) * s.count for i in layer_indices for s in specs[i])
    share = target / prunable
    if share >= 1.0:
        raise InvalidRequestError(
            f"ratio {ratio} would empty the pruned layers: it asks for {share:.0%} of layers "
            f"{layer_indices[0]}..{layer_indices[-1]}; widen --layers or lower --ratio"
        )
    keep: dict[LayerKind, int] = {}
    removed = 0.0
    for i in layer_indices:
        for spec in specs[i]:
            if spec.kind == "mlp":
                continue
            unit = _kv_count(adapter, layers[i]) if spec.kind == "head" else 1  # one head per KV group
            units = spec.count // unit
            drop = min(round(share * units), units - 1)
            keep[(i, spec.kind)] = (units - drop) * unit
            removed += drop * unit * group_cost(layers[i], spec)
    mlp_params = sum(group_cost(layers[i], s) * s.count for i in layer_indices for s in specs[i] if s.kind == "mlp")
    mlp_share = min(max((target - removed) / mlp_params, 0.0), 1.0) if mlp_params else 0.0
    for i in layer_indices:
        for spec in specs[i]:
            if spec.kind == "mlp":
                keep[(i, "mlp")] = max(spec.count - round(mlp_share * spec.count), 1)
    return keep


def _kv_count(adapter: Adapter, layer: torch.nn.Module) -> int:
    return adapter.widths(layer)["num_key_value_heads"]


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

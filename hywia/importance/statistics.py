"""What a calibration pass leaves for the criteria: group-level Taylor terms and per-channel activation sums.

Both statistics paths (the plain full backward and the layer-by-layer one) end in the same `Statistics`, built by
the same reduction (`taylor_terms`), so criteria never depend on how the gradients were obtained and the two paths
can be compared group by group.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, InvalidRequestError
from ..io.checks import first_non_finite
from ..models import Adapter, GroupSpec, LayerKind, TensorSlice
from ..offload import execution_device


@dataclass
class TaylorTerms:
    """One (layer, kind)'s group scores, float64 [count]: fine (sum of |s|) and coarse (sum over slices of |sum s|)
    for the first-order saliency s1 = g*W and the second-order s2 = g*W - 1/2*W*F*W."""

    fine1: torch.Tensor
    fine2: torch.Tensor
    coarse1: torch.Tensor
    coarse2: torch.Tensor

    def get(self, mode: str, order: int) -> torch.Tensor:
        if mode not in ("fine", "coarse") or order not in (1, 2):
            raise ValueError(f"no Taylor term {mode!r} of order {order}")
        return getattr(self, f"{mode}{order}")


@dataclass
class Statistics:
    """What one calibration pass collected for the pruned layers.

    `taylor` holds the group-level terms every gradient criterion reads. `fold_taylor`, when the pass was asked for
    folds, holds the same terms of each fold alone (window i in fold i % folds), so a learner can score groups on
    windows it is not judged on. `act_sq`/`act_sum` (keys: the full name of a Linear's weight) are sums over
    calibration tokens of each input channel's square and value. `grad` (mean gradient) and `fisher` (mean squared
    per-sample gradient) are per weight and kept only by the plain path: the layer-by-layer path frees them layer by
    layer, which is its point.
    """

    taylor: dict[LayerKind, TaylorTerms] = field(default_factory=dict)
    fold_taylor: list[dict[LayerKind, TaylorTerms]] = field(default_factory=list)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0
    loss: float = float("nan")


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean causal-LM loss of a batch of windows."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def blocks(tensor: torch.Tensor, s: TensorSlice, count: int) -> torch.Tensor:
    """A per-weight map reshaped to [count, elements of each group] for one slice."""
    return tensor.movedim(s.dim, 0).narrow(0, s.offset, count * s.block).reshape(count, -1)


def taylor_terms(
    spec: GroupSpec, tensors: Iterable[tuple[TensorSlice, torch.Tensor, torch.Tensor, torch.Tensor]]
) -> TaylorTerms:
    """Group terms of one kind from (slice, weight, mean gradient, Fisher diagonal) of each of its slices.

    The mean gradient and the Fisher diagonal must be complete (all samples) before this: |.| does not commute with
    the mean over samples.
    """
    terms = {name: torch.zeros(spec.count, dtype=torch.float64) for name in ("fine1", "fine2", "coarse1", "coarse2")}
    for s, weight, grad, fisher in tensors:
        first = grad * weight
        second = first - 0.5 * weight * fisher * weight
        for order, saliency in ((1, first), (2, second)):
            b = blocks(saliency, s, spec.count)
            terms[f"fine{order}"] += b.abs().sum(1).double().cpu()
            terms[f"coarse{order}"] += b.sum(1).abs().double().cpu()
    return TaylorTerms(**terms)


def fold_of(sample: int, folds: int) -> int:
    """The fold a calibration window belongs to: interleaved, so every fold sees every part of a mixed source."""
    return sample % folds


def fold_sizes(samples: int, folds: int) -> list[int]:
    """How many of `samples` windows each fold holds (`fold_of`)."""
    sizes = [0] * folds
    for sample in range(samples):
        sizes[fold_of(sample, folds)] += 1
    return sizes


def check_folds(folds: int, samples: int) -> None:
    """Refuse a fold count that would leave a fold without windows."""
    if not 1 <= folds <= max(samples, 1):
        raise InvalidRequestError(f"gradient folds must lie in [1, calibration windows = {samples}], got {folds}")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_finite(name: str, grad: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a non-finite gradient of the weight `name` (held in `dtype`): it would silently turn every score of
    its layer into NaN. Called once the loss was finite, so the backward pass itself overflowed there."""
    if not torch.isfinite(grad).all():
        raise CalibrationError(f"non-finite gradient in {name} (the loss was finite){_hint(dtype)}")


def non_finite_loss_error(model: nn.Module, adapter: Adapter, batches: torch.Tensor) -> CalibrationError:
    """Why the calibration loss is NaN or Inf, named at its source rather than where the gradient first shows it
    (the top pruned layer): a non-finite weight, else the first layer whose output overflows on some sample."""
    found = first_non_finite(model)
    if found is not None:
        return CalibrationError(f"non-finite loss: weight {found[0]} holds NaN or Inf values")
    dtype = next(model.parameters()).dtype
    first: list[int] = []

    def watch(module: nn.Module, args: tuple, output, index: int) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if not first and not torch.isfinite(hidden).all():
            first.append(index)

    handles = [layer.register_forward_hook(partial(watch, index=i)) for i, layer in enumerate(adapter.layers())]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids[None].to(execution_device(model)), use_cache=False)
                if first:
                    return CalibrationError(f"non-finite loss: the output of {adapter.layer_name(first[0])} overflows "
                                            f"to NaN or Inf on the calibration text{_hint(dtype)}")
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationError(f"non-finite loss after the decoder layers (final norm or output head){_hint(dtype)}")


def _hint(dtype: torch.dtype) -> str:
    """What to try: float32 only helps a model held in lower precision."""
    return "; try --dtype float32 or other calibration text" if dtype in LOW_PRECISION else \
        "; try other calibration text"


@contextmanager
def activation_hooks(model: nn.Module, stats: Statistics, prefixes: list[str]) -> Iterator[None]:
    """Sum every input channel (and its square) of each Linear under `prefixes` while the block runs."""
    handles = [
        module.register_forward_pre_hook(_activation_hook(stats, name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name.startswith(pre) for pre in prefixes)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def accumulate(table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in table:
        table[name] += value
    else:
        table[name] = value.clone()


def _activation_hook(stats: Statistics, module_name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        accumulate(stats.act_sq, f"{module_name}.weight", x.square().sum(0))
        accumulate(stats.act_sum, f"{module_name}.weight", x.sum(0))

    return hook

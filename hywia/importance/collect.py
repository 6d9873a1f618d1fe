"""One calibration pass: per-weight gradient statistics and per-channel input activation statistics.

Criteria read these and never run the model themselves (the learned fusion aside). Gradients are taken one
sample at a time so the Fisher diagonal is the mean of per-sample squared gradients, not the square of a mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..models import Adapter


@dataclass
class Statistics:
    """What the calibration pass collected for the tensors of the pruned layers (keys: full parameter names)."""

    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0
    loss: float = float("nan")


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean causal-LM loss of a batch of windows."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def collect_statistics(
    model: nn.Module,
    adapter: Adapter,
    layer_indices: list[int],
    batches: torch.Tensor,
    *,
    gradients: bool = True,
    activations: bool = True,
    progress: bool = True,
) -> Statistics:
    """Run the calibration windows through the model once, one sample per step."""
    stats = Statistics()
    device = next(model.parameters()).device
    prefixes = [adapter.layer_name(i) + "." for i in layer_indices]
    tracked = {n: p for n, p in model.named_parameters() if any(n.startswith(pre) for pre in prefixes)}
    hooks = []
    if activations:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(name.startswith(pre) for pre in prefixes):
                hooks.append(module.register_forward_pre_hook(_activation_hook(stats, name)))
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(gradients and name in tracked)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    try:
        for sample in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            input_ids = sample[None].to(device)
            if gradients:
                loss = lm_loss(model, input_ids)
                loss.backward()
                for name, param in tracked.items():
                    grad = param.grad.detach().float()
                    param.grad = None
                    if not torch.isfinite(grad).all():
                        raise CalibrationError(
                            f"non-finite gradient in {name}; try --dtype float32 or other calibration text"
                        )
                    _accumulate(stats.grad, name, grad)
                    _accumulate(stats.fisher, name, grad.square())
            else:
                with torch.no_grad():
                    loss = lm_loss(model, input_ids)
            total_loss += loss.item()
            stats.tokens += input_ids.numel()
            stats.samples += 1
    finally:
        for hook in hooks:
            hook.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        model.train(was_training)
    for table in (stats.grad, stats.fisher):
        for name in table:
            table[name] /= stats.samples
    stats.loss = total_loss / max(stats.samples, 1)
    return stats


def _accumulate(table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in table:
        table[name] += value
    else:
        table[name] = value.clone()


def _activation_hook(stats: Statistics, module_name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        _accumulate(stats.act_sq, f"{module_name}.weight", x.square().sum(0))
        _accumulate(stats.act_sum, f"{module_name}.weight", x.sum(0))

    return hook

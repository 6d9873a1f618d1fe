"""Tensor-level helpers shared by adapters: select rows/columns of a parameter, resize a Linear."""

from __future__ import annotations

import torch
from torch import nn


def select_param(root: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter `name` (relative to `root`) by its entries `index` along `dim`; fix Linear sizes."""
    module_name, _, param_name = name.rpartition(".")
    module = root.get_submodule(module_name)
    old = getattr(module, param_name)
    new = nn.Parameter(old.data.index_select(dim, index.to(old.device)).clone(), requires_grad=old.requires_grad)
    setattr(module, param_name, new)
    if isinstance(module, nn.Linear) and param_name == "weight":
        module.out_features, module.in_features = new.shape


def resize_linear(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    """A Linear of the new shape on the same device and dtype (its values are loaded or set afterwards)."""
    if (linear.out_features, linear.in_features) == (out_features, in_features):
        return linear
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def add_bias(linear: nn.Linear) -> None:
    """Give a Linear a zero bias (compensation writes into it), unless it has one."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))


def keep_groups(layer: nn.Module, spec, kept: torch.Tensor) -> None:
    """Cut the groups of `spec` (a GroupSpec) that are not in `kept` out of every tensor they own, in place.

    Positions a group kind does not own stay: in a fused tensor (Phi-3's qkv_proj) removing query heads keeps
    every k and v row. All slices of one tensor are cut in one go, so a cut never shifts another slice's offset.
    """
    every = torch.arange(spec.count)
    dropped = every[~torch.isin(every, kept.cpu())]
    owned: dict[tuple[str, int], list[torch.Tensor]] = {}
    for s in spec.slices:
        owned.setdefault((s.param, s.dim), []).append(spec.indices(dropped, s))
    for (param, dim), parts in owned.items():
        stays = torch.ones(layer.get_parameter(param).shape[dim], dtype=torch.bool)
        stays[torch.cat(parts)] = False
        select_param(layer, param, dim, stays.nonzero().squeeze(1))

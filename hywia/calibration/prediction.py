"""The least-squares prediction of an output projection's removed inputs from its kept inputs and a constant.

`--compensate lstsq` refits each output projection's kept columns and a bias so that W[:, R] x_R ~ A x_K + c. That
is the same as replacing the removed inputs by their prediction x_R <- B [x_K; 1] with
B = G[R, K'] (G[K', K'] + ridge)^-1 (G the Gram matrix of [x; 1], K' the kept columns and the constant) and keeping
W as it is. Whatever judges a cut as that compensation will make it (the fusion's held-out check and refit
objective, the profile search) replaces the inputs with this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import GroupSpec


def predictor(gram: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, ridge: float) -> torch.Tensor:
    """B^T [|K| + 1, |R|]: the ridge least-squares prediction of the removed inputs from the kept ones and a
    constant (module docstring), the ridge in units of the mean diagonal as the compensation adds it."""
    constant = torch.tensor([gram.shape[0] - 1])
    rows = torch.cat([kept, constant])
    system = gram[rows[:, None], rows]
    system.diagonal().add_(ridge * float(system.diagonal().mean()))
    return torch.linalg.solve(system, gram[rows[:, None], removed])


@dataclass(frozen=True)
class InputPrediction:
    """The least-squares prediction of a projection's removed inputs from its kept inputs and a constant."""

    kept: torch.Tensor  # input columns of the kept groups
    removed: torch.Tensor  # input columns of the other groups
    weights: torch.Tensor  # B^T, [|kept| + 1, |removed|]; the prediction is computed in its dtype

    def fill(self, x: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """`replacement` (shaped as `x`) with its removed columns set to their prediction from `x`'s kept ones."""
        dtype = self.weights.dtype
        z = torch.cat([x[..., self.kept].to(dtype), x.new_ones(*x.shape[:-1], 1, dtype=dtype)], -1)
        replacement[..., self.removed] = (z @ self.weights.to(x.device)).to(x.dtype)
        return replacement

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        """As a forward pre-hook of the projection: its input with the removed columns predicted."""
        return (self.fill(args[0], args[0].clone()),) + tuple(args[1:])


def input_prediction(gram: torch.Tensor, spec: GroupSpec, kept: list[int], ridge: float,
                     dtype: torch.dtype = torch.float64) -> InputPrediction | None:
    """The prediction of the inputs of `spec`'s groups outside `kept` from those of `kept` (`gram`: the Gram matrix
    of [x; 1] at its gate module); None when every group is kept."""
    kept_columns, removed_columns = spec.gate_columns(kept)
    if not removed_columns.numel():
        return None
    return InputPrediction(kept_columns, removed_columns,
                           predictor(gram, kept_columns, removed_columns, ridge).to(dtype))
